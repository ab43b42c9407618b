package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/xdcr/xdcr/checkpoints"
)

// Client talks to nodes' HTTP APIs.
type Client struct {
	HTTP *http.Client
}

// NewClient returns a client that gives up on a node after timeout.
func NewClient(timeout time.Duration) *Client {
	return &Client{HTTP: &http.Client{Timeout: timeout}}
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
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url(addr, "/v1/status"), nil)
	if err != nil {
		return st, err
	}
	if forwarded {
		req.Header.Set(ForwardedHeader, "1")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, remoteError(addr, resp)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("%s: decode status: %w", addr, err)
	}
	return st, nil
}

// Propose sends an encoded checkpoints command to the node at addr.
func (c *Client) Propose(ctx context.Context, addr string, cmd []byte, forwarded bool) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url(addr, "/v1/internal/propose"), bytes.NewReader(cmd))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if forwarded {
		req.Header.Set(ForwardedHeader, "1")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return remoteError(addr, resp)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
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

// Promote asks the node at addr to start a promotion.
func (c *Client) Promote(ctx context.Context, addr string, req PromoteRequest, forwarded bool) (PromoteResponse, error) {
	var out PromoteResponse
	body, err := json.Marshal(req)
	if err != nil {
		return out, err
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, url(addr, "/v1/promote"), bytes.NewReader(body))
	if err != nil {
		return out, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	if forwarded {
		hreq.Header.Set(ForwardedHeader, "1")
	}
	resp, err := c.HTTP.Do(hreq)
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return out, remoteError(addr, resp)
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return out, fmt.Errorf("%s: decode the promotion: %w", addr, err)
	}
	return out, nil
}
