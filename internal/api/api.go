// Package api is a node's HTTP surface: /healthz, /readyz, /metrics,
// /v1/status, and the internal endpoint through which followers forward
// Raft proposals to the leader; and the client that `xdcr lag` and the
// agents use to talk to it.
package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/xdcr/xdcr/checkpoints"
)

// ForwardedHeader marks a request one node passed on to another, so it is
// never passed on twice.
const ForwardedHeader = "X-Xdcr-Forwarded"

// Backend is what the server needs from the node.
type Backend interface {
	// Status returns the cluster's status, read consistently through the
	// Raft leader. forwarded is set when another node passed the request
	// on, and the backend must not pass it on again.
	Status(ctx context.Context, forwarded bool) (checkpoints.Status, error)
	// Propose applies an encoded checkpoints command through Raft.
	Propose(ctx context.Context, cmd []byte, forwarded bool) error
	// Ready returns nil when the node serves its purpose: a member of a Raft
	// group with a leader, and its pipeline running. Otherwise it says why.
	Ready() error
	// Promote starts moving the primary to another site.
	Promote(ctx context.Context, req PromoteRequest, forwarded bool) (PromoteResponse, error)
	// AbortPromotion drops the promotion in progress before it completes.
	AbortPromotion(ctx context.Context, req AbortRequest, forwarded bool) (PromoteResponse, error)
}

// AbortRequest is the body of POST /v1/promote/abort.
type AbortRequest struct {
	// ID, when set, aborts only that promotion; empty aborts the one in
	// progress.
	ID string `json:"id,omitempty"`
}

// PromoteRequest is the body of POST /v1/promote.
type PromoteRequest struct {
	To string `json:"to"`
	// Force fails over without the old primary (it is gone); without it,
	// a planned switchover that needs the old primary healthy.
	Force bool `json:"force,omitempty"`
	// ExpectedEpoch, when set, refuses the promotion if the cluster left
	// that epoch meanwhile.
	ExpectedEpoch uint64 `json:"expected_epoch,omitempty"`
	// ID names the promotion; repeating a request with the same ID is
	// harmless.
	ID string `json:"id,omitempty"`
}

// PromoteResponse says which promotion runs.
type PromoteResponse struct {
	ID    string `json:"id"`
	Kind  string `json:"kind"`
	From  string `json:"from"`
	To    string `json:"to"`
	Epoch uint64 `json:"epoch"` // the epoch that ends
}

// Error is the JSON body of every failed request.
type Error struct {
	Error string `json:"error"`
	// Code is a short machine-readable reason: "no_leader", "rejected",
	// "unavailable", "bad_request".
	Code string `json:"code"`
}

// Error codes.
const (
	CodeNoLeader    = "no_leader"
	CodeRejected    = "rejected"
	CodeUnavailable = "unavailable"
	CodeBadRequest  = "bad_request"
	// CodeUnauthorized: the request lacks the admin token (HTTP 401).
	CodeUnauthorized = "unauthorized"
)

// Auth guards a node's API.
type Auth struct {
	// Token, when set, must come as "Authorization: Bearer <token>" with
	// every request that changes state.
	Token string
	// ProtectReads requires the token on /v1/status and /metrics too.
	// /healthz and /readyz are always open, for probes.
	ProtectReads bool
	// TLS, when set, serves HTTPS with its certificate.
	TLS *tls.Config
}

// StatusError lets a backend choose the HTTP status and code of an error.
type StatusError struct {
	HTTP int
	Code string
	Err  error
}

func (e *StatusError) Error() string { return e.Err.Error() }
func (e *StatusError) Unwrap() error { return e.Err }

// Server serves a node's HTTP API.
type Server struct {
	auth     Auth
	tokenSum [sha256.Size]byte
	backend  Backend
	registry *prometheus.Registry
	log      *slog.Logger
	srv      *http.Server
}

// NewServer returns a server for addr; nothing listens until Run.
func NewServer(addr string, backend Backend, registry *prometheus.Registry, auth Auth, log *slog.Logger) *Server {
	s := &Server{auth: auth, tokenSum: sha256.Sum256([]byte(auth.Token)), backend: backend, registry: registry, log: log.With("component", "http")}
	read := func(h http.Handler) http.Handler {
		if auth.ProtectReads {
			return s.guard(h)
		}
		return h
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /metrics", read(promhttp.HandlerFor(registry, promhttp.HandlerOpts{Registry: registry})))
	mux.Handle("GET /v1/status", read(http.HandlerFunc(s.status)))
	mux.Handle("POST /v1/internal/propose", s.guard(http.HandlerFunc(s.propose)))
	mux.Handle("POST /v1/promote", s.guard(http.HandlerFunc(s.promote)))
	mux.Handle("POST /v1/promote/abort", s.guard(http.HandlerFunc(s.abort)))
	s.srv = &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return s
}

// Run listens and serves until ctx ends, then shuts down gracefully.
func (s *Server) Run(ctx context.Context) error {
	l, err := net.Listen("tcp", s.srv.Addr)
	if err != nil {
		return fmt.Errorf("listen on %s for the HTTP API: %w", s.srv.Addr, err)
	}
	if s.auth.TLS != nil {
		l = tls.NewListener(l, s.auth.TLS)
	}
	s.log.Info("http api listening", "addr", l.Addr().String(), "tls", s.auth.TLS != nil)
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(l) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http api: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("stop the http api: %w", err)
	}
	return nil
}

// guard lets a request through to h only with the admin token, when one
// is configured. The tokens are compared as SHA-256 sums in constant time,
// so neither their content nor their length shows in the timing.
func (s *Server) guard(h http.Handler) http.Handler {
	if s.auth.Token == "" {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		sum := sha256.Sum256([]byte(strings.TrimSpace(token)))
		if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(sum[:], s.tokenSum[:]) != 1 {
			s.log.Warn("refused a request without the admin token", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr)
			w.Header().Set("WWW-Authenticate", `Bearer realm="xdcr"`)
			writeJSON(w, http.StatusUnauthorized, Error{
				Error: "this endpoint needs the admin token: send Authorization: Bearer <token>, the token of the config's http.admin_token or http.admin_token_file",
				Code:  CodeUnauthorized,
			})
			return
		}
		h.ServeHTTP(w, r)
	})
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintln(w, "ok")
}

func (s *Server) readyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if err := s.backend.Ready(); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "not ready:", err)
		return
	}
	fmt.Fprintln(w, "ok")
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	st, err := s.backend.Status(r.Context(), r.Header.Get(ForwardedHeader) != "")
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// maxCommand bounds a proposal's body.
const maxCommand = 1 << 20

func (s *Server) propose(w http.ResponseWriter, r *http.Request) {
	cmd, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxCommand))
	if err != nil {
		s.fail(w, &StatusError{HTTP: http.StatusBadRequest, Code: CodeBadRequest, Err: err})
		return
	}
	if err := s.backend.Propose(r.Context(), cmd, r.Header.Get(ForwardedHeader) != ""); err != nil {
		s.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) promote(w http.ResponseWriter, r *http.Request) {
	var req PromoteRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxCommand)).Decode(&req); err != nil || req.To == "" {
		if err == nil {
			err = errors.New(`"to" names no site`)
		}
		s.fail(w, &StatusError{HTTP: http.StatusBadRequest, Code: CodeBadRequest, Err: err})
		return
	}
	resp, err := s.backend.Promote(r.Context(), req, r.Header.Get(ForwardedHeader) != "")
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, resp)
}

func (s *Server) abort(w http.ResponseWriter, r *http.Request) {
	var req AbortRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxCommand)).Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		s.fail(w, &StatusError{HTTP: http.StatusBadRequest, Code: CodeBadRequest, Err: err})
		return
	}
	resp, err := s.backend.AbortPromotion(r.Context(), req, r.Header.Get(ForwardedHeader) != "")
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) fail(w http.ResponseWriter, err error) {
	se := &StatusError{HTTP: http.StatusInternalServerError, Code: CodeUnavailable, Err: err}
	errors.As(err, &se)
	writeJSON(w, se.HTTP, Error{Error: err.Error(), Code: se.Code})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // the client went away; nothing to do
}
