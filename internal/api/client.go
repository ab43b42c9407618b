package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/xdcr/xdcr/checkpoints"
	"github.com/xdcr/xdcr/internal/certs"
	"github.com/xdcr/xdcr/internal/config"
)

// Client talks to nodes' HTTP APIs.
type Client struct {
	HTTP *http.Client
	// Token is sent as "Authorization: Bearer <token>" with every request
	// when set: the nodes' admin token (config http.admin_token).
	Token string
	https bool
}

// NewClient returns a client that gives up on a node after timeout and
// sends token (empty: none) with its requests.
func NewClient(timeout time.Duration, token string) *Client {
	return &Client{HTTP: &http.Client{Timeout: timeout}, Token: token}
}

// ClientFor returns a client for the nodes of cfg: with its admin token,
// and speaking HTTPS verified with tls.ca_file when http.tls is set.
func ClientFor(cfg *config.Config, timeout time.Duration) (*Client, error) {
	token, err := cfg.HTTP.Token()
	if err != nil {
		return nil, err
	}
	c := NewClient(timeout, token)
	if cfg.HTTP.TLS {
		pool, err := certs.LoadPool(cfg.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("http.tls: %w", err)
		}
		c.UseTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	}
	return c, nil
}

// UseTLS makes the client speak HTTPS to addresses without a scheme,
// verifying the nodes with cfg (its RootCAs).
func (c *Client) UseTLS(cfg *tls.Config) {
	c.HTTP.Transport = &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
	c.https = true
}

// RemoteError is a failure a node reported.
type RemoteError struct {
	Addr   string
	Status int
	Body   Error
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("%s: %s (%s)", e.Addr, e.Body.Error, e.Body.Code)
}

// Status fetches /v1/status from the node at addr (host:port).
func (c *Client) Status(ctx context.Context, addr string, forwarded bool) (checkpoints.Status, error) {
	var st checkpoints.Status
	err := c.call(ctx, http.MethodGet, addr, "/v1/status", nil, forwarded, &st)
	return st, err
}

// Propose sends an encoded checkpoints command to the node at addr.
func (c *Client) Propose(ctx context.Context, addr string, cmd []byte, forwarded bool) error {
	return c.call(ctx, http.MethodPost, addr, "/v1/internal/propose", cmd, forwarded, nil)
}

// Promote asks the node at addr to start a promotion.
func (c *Client) Promote(ctx context.Context, addr string, req PromoteRequest, forwarded bool) (PromoteResponse, error) {
	var out PromoteResponse
	body, err := json.Marshal(req)
	if err != nil {
		return out, err
	}
	err = c.call(ctx, http.MethodPost, addr, "/v1/promote", body, forwarded, &out)
	return out, err
}

// AbortPromotion asks the node at addr to abort the promotion in progress.
func (c *Client) AbortPromotion(ctx context.Context, addr string, req AbortRequest, forwarded bool) (PromoteResponse, error) {
	var out PromoteResponse
	body, err := json.Marshal(req)
	if err != nil {
		return out, err
	}
	err = c.call(ctx, http.MethodPost, addr, "/v1/promote/abort", body, forwarded, &out)
	return out, err
}

// call sends body (JSON, or nothing when nil) and decodes a 2xx answer
// into out unless out is nil; any other answer is a *RemoteError.
func (c *Client) call(ctx context.Context, method, addr, path string, body []byte, forwarded bool, out any) error {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	if c.https && !strings.Contains(addr, "://") {
		addr = "https://" + addr
	}
	req, err := http.NewRequestWithContext(ctx, method, url(addr, path), r)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if forwarded {
		req.Header.Set(ForwardedHeader, "1")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return remoteError(addr, resp)
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s: decode the answer to %s %s: %w", addr, method, path, err)
	}
	return nil
}

func remoteError(addr string, resp *http.Response) error {
	e := &RemoteError{Addr: addr, Status: resp.StatusCode}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &e.Body) != nil || e.Body.Error == "" {
		e.Body = Error{Error: strings.TrimSpace(string(b)), Code: http.StatusText(resp.StatusCode)}
	}
	return e
}

func url(addr, path string) string {
	if strings.HasPrefix(addr, "http://") || strings.HasPrefix(addr, "https://") {
		return strings.TrimSuffix(addr, "/") + path
	}
	return "http://" + addr + path
}
