package cache

import (
	"path"
	"reflect"
	"testing"

	"github.com/xdcr/xdcr/internal/config"
)

func TestCompile(t *testing.T) {
	for _, tc := range []struct {
		text    string
		cols    []string
		render  []string
		want    string
		pattern string
		err     string
	}{
		{text: "account:{id}", cols: []string{"id"}, render: []string{"42"}, want: "account:42", pattern: "account:*"},
		{text: "o:{tenant}:{id}", cols: []string{"tenant", "id"}, render: []string{"t1", "7"}, want: "o:t1:7", pattern: "o:*:*"},
		{text: "{id}", cols: []string{"id"}, render: []string{"x"}, want: "x", pattern: "*"},
		{text: "{a}{b}", cols: []string{"a", "b"}, render: []string{"1", "2"}, want: "12", pattern: "**"},
		{text: "fixed", render: nil, want: "fixed", pattern: "fixed"},
		{text: "e:{Id}", cols: []string{"Id"}, render: []string{"1"}, want: "e:1", pattern: "e:*"},
		{text: "a {odd name}!", cols: []string{"odd name"}, render: []string{"v"}, want: "a v!", pattern: "a *!"},
		{text: `g*?[x]\:{id}`, cols: []string{"id"}, render: []string{"1"}, want: `g*?[x]\:1`, pattern: `g\*\?\[x\]\\:*`},
		{text: "x:{id}:{id}", cols: []string{"id", "id"}, render: []string{"1", "1"}, want: "x:1:1", pattern: "x:*:*"},
		{text: "", err: "is empty"},
		{text: "a:{id", err: "has a '{' without its closing '}'"},
		{text: "a:id}", err: "has a '}' without an opening '{'"},
		{text: "a:{}", err: "has an empty placeholder {}"},
		{text: "a:{ }", err: "has an empty placeholder {}"},
		{text: "a:{{id}}", err: "has a '{' inside a placeholder; placeholders do not nest"},
	} {
		t.Run(tc.text, func(t *testing.T) {
			tpl, err := Compile(tc.text)
			// the config validates templates with its own parser: both
			// must agree on what is a template
			_, cerr := config.TemplateColumns(tc.text)
			if (err == nil) != (cerr == nil) || err != nil && err.Error() != cerr.Error() {
				t.Errorf("Compile says %v, config.TemplateColumns says %v", err, cerr)
			}
			if tc.err != "" {
				if err == nil || err.Error() != tc.err {
					t.Fatalf("got %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(tpl.Columns(), tc.cols) {
				t.Errorf("columns: got %q, want %q", tpl.Columns(), tc.cols)
			}
			if got := tpl.Render(tc.render); got != tc.want {
				t.Errorf("render: got %q, want %q", got, tc.want)
			}
			if got := tpl.Pattern(); got != tc.pattern {
				t.Errorf("pattern: got %q, want %q", got, tc.pattern)
			}
			// the pattern matches what the template produces (path.Match
			// has Redis's glob syntax for these cases)
			if ok, err := path.Match(tpl.Pattern(), tc.want); err != nil || !ok {
				t.Errorf("pattern %q does not match %q (%v)", tpl.Pattern(), tc.want, err)
			}
			if tpl.String() != tc.text {
				t.Errorf("String: got %q", tpl.String())
			}
		})
	}
}
