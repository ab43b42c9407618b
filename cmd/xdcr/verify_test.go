package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator/verify"
)

func TestVerifyExit(t *testing.T) {
	table := func(result string) verify.TableReport { return verify.TableReport{Table: "public.t", Result: result} }
	site := func(name string, results ...string) verify.SiteReport {
		s := verify.SiteReport{Site: name}
		for _, r := range results {
			s.Tables = append(s.Tables, table(r))
		}
		return s
	}
	for _, tc := range []struct {
		name  string
		sites []verify.SiteReport
		want  int
	}{
		{"equal", []verify.SiteReport{site("dc-b", "equal", "equal")}, exitOK},
		{"lagging", []verify.SiteReport{site("dc-b", "equal"), site("dc-c", "lagging")}, exitLag},
		{"unsettled", []verify.SiteReport{site("dc-b", "unsettled")}, exitLag},
		{"error beats lagging", []verify.SiteReport{site("dc-b", "lagging"), site("dc-c", "error")}, exitFailure},
		{"unreachable site", []verify.SiteReport{{Site: "dc-b", Result: "error", Error: "connect"}}, exitFailure},
		{"differs beats everything", []verify.SiteReport{site("dc-b", "error", "lagging"), site("dc-c", "differs")}, exitDiff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := verifyExit(&verify.Report{Sites: tc.sites})
			got := exitOK
			var ee *exitError
			if errors.As(err, &ee) {
				got = ee.code
			} else if err != nil {
				t.Fatalf("got %v, want an exitError or nil", err)
			}
			if got != tc.want {
				t.Errorf("exit %d (%v), want %d", got, err, tc.want)
			}
		})
	}
}

func TestVerifySites(t *testing.T) {
	cfg := &config.Config{Sites: map[string]config.Site{"dc-a": {Postgres: "a"}, "dc-b": {Postgres: "b"}, "dc-c": {Postgres: "c"}}}
	got, err := verifySites(cfg, "dc-b", nil)
	if err != nil || len(got) != 2 || got[0].Name != "dc-a" || got[1].Name != "dc-c" || got[1].DSN != "c" {
		t.Errorf("every replica of primary dc-b: got %v, %v", got, err)
	}
	if _, err := verifySites(cfg, "dc-a", []string{"dc-a"}); err == nil || !strings.Contains(err.Error(), "is the primary") {
		t.Errorf("--site naming the primary: got %v", err)
	}
	if _, err := verifySites(cfg, "dc-a", []string{"dc-x"}); err == nil || !strings.Contains(err.Error(), "not in the config") {
		t.Errorf("unknown --site: got %v", err)
	}
}

func TestRenderVerify(t *testing.T) {
	from, to := "100", "120"
	n, m := int64(1000), int64(999)
	rep := &verify.Report{Cluster: "shop", Primary: "dc-a", Epoch: 2, Sites: []verify.SiteReport{
		{Site: "dc-b", Result: "differs", Tables: []verify.TableReport{
			{Table: "public.items", Key: []string{"id"}, Result: "differs", RowsPrimary: &n, RowsReplica: &m,
				Ranges: []verify.KeyRange{{From: &from, To: &to}, {From: &to}}, Missing: []string{"105"}, Different: []string{"130"}},
			{Table: "public.bag", Result: "differs", RowsPrimary: &n, RowsReplica: &n, Note: "compared as a whole, counts only"},
		}},
		{Site: "dc-c", Result: "error", Error: "replica dc-c: connect: refused", Tables: []verify.TableReport{}},
	}}
	var b bytes.Buffer
	renderVerify(&b, rep)
	out := b.String()
	for _, want := range []string{
		"Cluster: shop   primary dc-a   epoch 2",
		"1,000", "999", "[100, 120)", "[120, …)", "whole table",
		"dc-b public.items: missing id 105",
		"dc-b public.items: different id 130",
		"dc-b public.bag: compared as a whole, counts only",
		"dc-c: replica dc-c: connect: refused",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
