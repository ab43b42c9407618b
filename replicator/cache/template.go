package cache

import (
	"errors"
	"strings"
)

// Template is a compiled cache key template such as "account:{id}":
// literal text and {column} placeholders. The grammar is the config's
// (internal/config TemplateColumns): every '{' opens a placeholder that a
// '}' closes, placeholders do not nest and are not blank, and the text
// between the braces is a column name exactly as the database spells it.
type Template struct {
	text  string
	parts []string // literal text around the placeholders: len(cols)+1 parts
	cols  []string // the placeholders' column names, in order
}

// Compile parses a key template.
func Compile(text string) (Template, error) {
	if text == "" {
		return Template{}, errors.New("is empty")
	}
	t := Template{text: text}
	var lit strings.Builder
	for i := 0; i < len(text); i++ {
		switch text[i] {
		case '{':
			end := strings.IndexAny(text[i+1:], "{}")
			if end < 0 {
				return Template{}, errors.New("has a '{' without its closing '}'")
			}
			if text[i+1+end] == '{' {
				return Template{}, errors.New("has a '{' inside a placeholder; placeholders do not nest")
			}
			col := text[i+1 : i+1+end]
			if strings.TrimSpace(col) == "" {
				return Template{}, errors.New("has an empty placeholder {}")
			}
			t.parts = append(t.parts, lit.String())
			t.cols = append(t.cols, col)
			lit.Reset()
			i += 1 + end
		case '}':
			return Template{}, errors.New("has a '}' without an opening '{'")
		default:
			lit.WriteByte(text[i])
		}
	}
	t.parts = append(t.parts, lit.String())
	return t, nil
}

// String returns the template as written.
func (t Template) String() string { return t.text }

// Columns returns the placeholders' column names, in order (a column may
// appear twice).
func (t Template) Columns() []string { return t.cols }

// Render builds the key from one value per placeholder, in order.
func (t Template) Render(vals []string) string {
	n := 0
	for _, p := range t.parts {
		n += len(p)
	}
	for _, v := range vals {
		n += len(v)
	}
	var b strings.Builder
	b.Grow(n)
	for i, p := range t.parts {
		b.WriteString(p)
		if i < len(vals) {
			b.WriteString(vals[i])
		}
	}
	return b.String()
}

// Pattern returns a Redis glob (SCAN MATCH) that matches every key the
// template can produce: each placeholder becomes '*' and the glob's special
// characters in the literal text are escaped. It may match more keys than
// the template produces ('*' also matches ':'), never fewer.
func (t Template) Pattern() string {
	var b strings.Builder
	for i, p := range t.parts {
		for j := 0; j < len(p); j++ {
			switch p[j] {
			case '*', '?', '[', ']', '\\':
				b.WriteByte('\\')
			}
			b.WriteByte(p[j])
		}
		if i < len(t.cols) {
			b.WriteByte('*')
		}
	}
	return b.String()
}
