package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/xdcr/xdcr/checkpoints"
)

// fakeBackend counts the calls that got through the guard.
type fakeBackend struct{ promotes, aborts, proposals, statuses int }

func (f *fakeBackend) Status(context.Context, bool) (checkpoints.Status, error) {
	f.statuses++
	return checkpoints.Status{Cluster: "shop", Primary: "dc-a", Epoch: 1}, nil
}

func (f *fakeBackend) Propose(context.Context, []byte, bool) error { f.proposals++; return nil }
func (f *fakeBackend) Ready() error                                { return errors.New("no leader yet") }

func (f *fakeBackend) Promote(_ context.Context, req PromoteRequest, _ bool) (PromoteResponse, error) {
	f.promotes++
	return PromoteResponse{ID: "p1", To: req.To}, nil
}

func (f *fakeBackend) AbortPromotion(context.Context, AbortRequest, bool) (PromoteResponse, error) {
	f.aborts++
	return PromoteResponse{ID: "p1"}, nil
}

const token = "0123456789abcdef0123"

func serve(t *testing.T, auth Auth) (*fakeBackend, string) {
	t.Helper()
	b := &fakeBackend{}
	s := NewServer("127.0.0.1:0", b, prometheus.NewRegistry(), auth, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ts := httptest.NewServer(s.srv.Handler)
	t.Cleanup(ts.Close)
	return b, ts.URL
}

func TestAdminToken(t *testing.T) {
	b, url := serve(t, Auth{Token: token})
	ctx := t.Context()
	for _, tok := range []string{"", "wrong", token + "x", token[:len(token)-1]} {
		c := NewClient(0, tok)
		for name, call := range map[string]func() error{
			"promote": func() error { _, err := c.Promote(ctx, url, PromoteRequest{To: "dc-b"}, false); return err },
			"abort":   func() error { _, err := c.AbortPromotion(ctx, url, AbortRequest{}, false); return err },
			"propose": func() error { return c.Propose(ctx, url, []byte("{}"), false) },
		} {
			var re *RemoteError
			if err := call(); !errors.As(err, &re) || re.Status != http.StatusUnauthorized || re.Body.Code != CodeUnauthorized {
				t.Errorf("%s with token %q: got %v, want 401 %s", name, tok, err, CodeUnauthorized)
			}
		}
	}
	if b.promotes+b.aborts+b.proposals != 0 {
		t.Fatalf("refused requests reached the backend: %+v", b)
	}
	// reads stay open
	if _, err := NewClient(0, "").Status(ctx, url, false); err != nil {
		t.Errorf("status without a token: %v", err)
	}

	c := NewClient(0, token)
	if resp, err := c.Promote(ctx, url, PromoteRequest{To: "dc-b"}, false); err != nil || resp.To != "dc-b" {
		t.Errorf("promote with the token: %+v, %v", resp, err)
	}
	if _, err := c.AbortPromotion(ctx, url, AbortRequest{}, false); err != nil {
		t.Errorf("abort with the token: %v", err)
	}
	if err := c.Propose(ctx, url, []byte("{}"), false); err != nil {
		t.Errorf("propose with the token: %v", err)
	}
	// the scheme is case-insensitive (RFC 7235)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/internal/propose", nil)
	req.Header.Set("Authorization", "bearer "+token)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusNoContent {
		t.Errorf("lower-case bearer: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if b.promotes != 1 || b.aborts != 1 || b.proposals != 2 {
		t.Errorf("backend calls: %+v, want 1 promote, 1 abort, 2 proposals", b)
	}
}

func TestProtectReads(t *testing.T) {
	b, url := serve(t, Auth{Token: token, ProtectReads: true})
	ctx := t.Context()
	var re *RemoteError
	if _, err := NewClient(0, "").Status(ctx, url, false); !errors.As(err, &re) || re.Status != http.StatusUnauthorized {
		t.Errorf("status without a token: got %v, want 401", err)
	}
	if _, err := NewClient(0, token).Status(ctx, url, false); err != nil {
		t.Errorf("status with the token: %v", err)
	}
	for path, want := range map[string]int{"/metrics": http.StatusUnauthorized, "/healthz": http.StatusOK, "/readyz": http.StatusServiceUnavailable} {
		resp, err := http.Get(url + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s without a token: %d, want %d", path, resp.StatusCode, want)
		}
	}
	if b.statuses != 1 {
		t.Errorf("backend saw %d status reads, want 1", b.statuses)
	}
}

func TestNoToken(t *testing.T) {
	b, url := serve(t, Auth{})
	if _, err := NewClient(0, "").Promote(t.Context(), url, PromoteRequest{To: "dc-b"}, false); err != nil || b.promotes != 1 {
		t.Errorf("promote on an API without a token: %v (%d calls)", err, b.promotes)
	}
}
