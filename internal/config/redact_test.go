package config

import (
	"strings"
	"testing"
)

func TestRedactDSN(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"postgres://xdcr:secret@10.1.0.5:5432/shop", "postgres://xdcr:xxxxx@10.1.0.5:5432/shop"},
		{"postgresql://xdcr@10.1.0.5/shop", "postgresql://xdcr@10.1.0.5/shop"},
		{"postgres://10.1.0.5/shop?sslmode=require", "postgres://10.1.0.5/shop?sslmode=require"},
		{"postgres://xdcr:p%40ss@h/db", "postgres://xdcr:xxxxx@h/db"},
		// A password holding '/', '?' or '@' that a strict parser would split.
		{"postgres://xdcr:pa/ss@h/db", "postgres://xdcr:xxxxx@h/db"},
		{"postgres://xdcr:pa?ss@h/db", "postgres://xdcr:xxxxx@h/db"},
		{"postgres://xdcr:p@ss@h/db", "postgres://xdcr:xxxxx@h/db"},
		{"postgres://h/db?password=secret&sslmode=require", "postgres://h/db?password=xxxxx&sslmode=require"},
		{"postgres://h/db?sslpassword=secret", "postgres://h/db?sslpassword=xxxxx"},
		{"postgres://h/db?pass%77ord=secret", "postgres://h/db?pass%77ord=xxxxx"},
		{"POSTGRES://u:secret@h/db", "POSTGRES://u:xxxxx@h/db"},
		{"host=h user=xdcr password=secret dbname=shop", "host=h user=xdcr password=xxxxx dbname=shop"},
		{"host=h password = secret", "host=h password = xxxxx"},
		{"host=h password='se cret' dbname=shop", "host=h password=xxxxx dbname=shop"},
		{`host=h password='se\' cret' dbname=shop`, "host=h password=xxxxx dbname=shop"},
		{"host=h password='unterminated", "host=h password=xxxxx"},
		{"host=h sslpassword=secret", "host=h sslpassword=xxxxx"},
		{"host=h PASSWORD=secret", "host=h PASSWORD=xxxxx"},
		{"host=h application_name=x://y password=secret", "host=h application_name=x://y password=xxxxx"},
		// NATS and Redis: a bare userinfo is a token.
		{"nats://tok3n@10.1.0.6:4222", "nats://xxxxx@10.1.0.6:4222"},
		{"nats://user:pw@a:4222,nats://user:pw@b:4222", "nats://xxxxx@a:4222,nats://xxxxx@b:4222"},
		{"nats://a:4222,tls://b:4222", "nats://a:4222,tls://b:4222"},
		{"redis://:secret@10.1.0.7:6379/0", "redis://xxxxx@10.1.0.7:6379/0"},
		{"rediss://default:secret@cache:6380", "rediss://xxxxx@cache:6380"},
		{"nats://0000@:@h", "nats://xxxxx@h"},
		{"not a dsn", "not a dsn"},
	} {
		if got := RedactDSN(tc.in); got != tc.want {
			t.Errorf("RedactDSN(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestScrubber(t *testing.T) {
	s := newScrubber([]string{"ab", "secret", "secret-long", "secret"}, minScrubLen)
	got := s.scrub("x secret-long y secret z ab")
	if want := "x xxxxx y xxxxx z ab"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func FuzzRedactDSN(f *testing.F) {
	for _, s := range []string{
		"postgres://xdcr:secret@10.1.0.5:5432/shop",
		"host=h password='se cret' dbname=shop",
		"nats://tok@a:4222,nats://u:p@b:4222",
		"postgres://h/db?password=x&y=z",
	} {
		f.Add(s, "s3cr3t")
	}
	f.Fuzz(func(t *testing.T, prefix, secret string) {
		// A password of URL-safe characters placed in the userinfo or as a
		// key=value password never survives.
		if len(secret) < 4 || strings.ContainsAny(secret, "@:/?#,&' \t\n\r\v\f\\=") || strings.Contains(prefix, secret) {
			return
		}
		for _, dsn := range []string{
			"postgres://u:" + secret + "@" + prefix,
			"nats://" + secret + "@" + prefix,
			"host=" + strings.Fields(prefix + " x")[0] + " password=" + secret,
		} {
			if got := RedactDSN(dsn); strings.Contains(got, secret) {
				t.Fatalf("RedactDSN(%q) = %q keeps the password", dsn, got)
			}
		}
	})
}
