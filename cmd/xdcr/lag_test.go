package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/internal/api"
	"github.com/xdcr/xdcr/internal/config"
)

// statusNode serves /v1/status: "no leader" for the first noLeader calls,
// then a status naming primary dc-a.
func statusNode(t *testing.T, noLeader int32) (addr string, calls *atomic.Int32) {
	calls = new(atomic.Int32)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if calls.Add(1) <= noLeader {
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(api.Error{Error: "no leader", Code: api.CodeNoLeader})
			return
		}
		json.NewEncoder(w).Encode(checkpoints.Status{Cluster: "test", Primary: "dc-a", Epoch: 1})
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), calls
}

func TestFetchStatusWaitsForElection(t *testing.T) {
	addr, calls := statusNode(t, 3)
	cfg := &config.Config{Nodes: map[string]config.Node{"a1": {Site: "dc-a", HTTP: addr}}}
	st, err := fetchStatus(t.Context(), api.NewClient(time.Second, ""), cfg)
	if err != nil {
		t.Fatalf("a node that elects a leader after 3 asks: %v", err)
	}
	if st.Primary != "dc-a" || calls.Load() != 4 {
		t.Errorf("got primary %q after %d calls, want dc-a after 4", st.Primary, calls.Load())
	}
}

func TestFetchStatusGivesUpWithoutLeader(t *testing.T) {
	addr, _ := statusNode(t, 1<<30)
	cfg := &config.Config{Nodes: map[string]config.Node{
		"a1": {Site: "dc-a", HTTP: addr},
		"b1": {Site: "dc-b", HTTP: "127.0.0.1:1"}, // nothing listens
	}}
	start := time.Now()
	_, err := fetchStatus(t.Context(), api.NewClient(time.Second, ""), cfg)
	if err == nil || !strings.Contains(err.Error(), "no Raft majority") || !strings.Contains(err.Error(), "b1 (127.0.0.1:1)") {
		t.Fatalf("got %v, want a no-majority error naming both nodes", err)
	}
	if waited := time.Since(start); waited < electionWait-3*time.Second || waited > electionWait+3*time.Second {
		t.Errorf("gave up after %s, want about %s", waited, electionWait)
	}
}

func TestFetchStatusDoesNotWaitForDeadNodes(t *testing.T) {
	cfg := &config.Config{Nodes: map[string]config.Node{"a1": {Site: "dc-a", HTTP: "127.0.0.1:1"}}}
	start := time.Now()
	_, err := fetchStatus(t.Context(), api.NewClient(time.Second, ""), cfg)
	if err == nil || !strings.Contains(err.Error(), "no node answered") {
		t.Fatalf("got %v, want no node answered", err)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		t.Errorf("waited %s for a node that refuses connections", waited)
	}
}
