package faults

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// Kinds of WAN link.
const (
	KindLeaf = "leaf" // a NATS leaf-node connection between two sites' servers
	KindRaft = "raft" // Raft RPCs from one node to another
	KindHTTP = "http" // one agent's HTTP requests to another (forwarded proposals, promotions)
)

// Link is one proxied connection path between two sites: From's side dials
// the proxy, which forwards to To's side.
type Link struct {
	*Proxy
	Kind     string
	From, To string // site names ("witness" for a witness node)
}

// WAN is the set of proxied links between local sites. deploy/local routes
// the leaf-node links through it (SitesConfig.WAN) and deploy/topology the
// Raft and HTTP traffic between agents (Options.WAN); a test then cuts,
// delays or throttles them by site. Its methods are safe for concurrent
// use.
type WAN struct {
	log *slog.Logger

	mu    sync.Mutex
	links []*Link
}

// NewWAN returns an empty WAN; log receives a line per change (nil: none).
func NewWAN(log *slog.Logger) *WAN {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &WAN{log: log}
}

// Add starts a proxy on a free loopback port for traffic of kind that
// site from sends to target in site to, and returns it: from's side must
// dial the link's Addr instead of target.
func (w *WAN) Add(kind, from, to, target string) (*Link, error) {
	if from == to {
		return nil, fmt.Errorf("wan link %s %s->%s: both ends in one site", kind, from, to)
	}
	p, err := NewProxy(fmt.Sprintf("%s %s->%s", kind, from, to), "127.0.0.1:0", target, w.log)
	if err != nil {
		return nil, fmt.Errorf("wan link: %w", err)
	}
	l := &Link{Proxy: p, Kind: kind, From: from, To: to}
	w.mu.Lock()
	w.links = append(w.links, l)
	w.mu.Unlock()
	return l, nil
}

// Links returns every link, in the order they were added.
func (w *WAN) Links() []*Link {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.links)
}

// Of returns the links with site at either end.
func (w *WAN) Of(site string) []*Link {
	var out []*Link
	for _, l := range w.Links() {
		if l.From == site || l.To == site {
			out = append(out, l)
		}
	}
	return out
}

// Partition separates group from every other site: each link with exactly
// one end in group is cut (mode Refuse) or black-holed (mode Blackhole).
// Links inside group, and between other sites, are left as they are. It
// returns the links it changed.
func (w *WAN) Partition(mode Mode, group ...string) []*Link {
	var changed []*Link
	for _, l := range w.Links() {
		if slices.Contains(group, l.From) == slices.Contains(group, l.To) {
			continue
		}
		switch mode {
		case Refuse:
			l.Cut()
		case Blackhole:
			l.Blackhole()
		default:
			l.Restore()
		}
		changed = append(changed, l)
	}
	w.log.Info("wan partition", "group", group, "mode", mode.String(), "links", len(changed))
	return changed
}

// Isolate cuts every link of site (Partition(Refuse, site)).
func (w *WAN) Isolate(site string) []*Link { return w.Partition(Refuse, site) }

// Heal restores every link, and clears every delay and rate limit.
func (w *WAN) Heal() {
	for _, l := range w.Links() {
		l.Restore()
		l.SetDelay(0)
		l.SetRate(0)
	}
	w.log.Info("wan healed")
}

// SetDelay delays every link with site at one end (every link when site is
// "") by d in each direction.
func (w *WAN) SetDelay(site string, d time.Duration) {
	for _, l := range w.Links() {
		if site == "" || l.From == site || l.To == site {
			l.SetDelay(d)
		}
	}
}

// SetRate limits every link with site at one end (every link when site is
// "") to bytesPerSecond per connection and direction.
func (w *WAN) SetRate(site string, bytesPerSecond int) {
	for _, l := range w.Links() {
		if site == "" || l.From == site || l.To == site {
			l.SetRate(bytesPerSecond)
		}
	}
}

// Close closes every proxy.
func (w *WAN) Close() error {
	var errs []error
	for _, l := range w.Links() {
		errs = append(errs, l.Close())
	}
	return errors.Join(errs...)
}
