package checkpoints

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/xdcr/xdcr/replicator/change"
)

// Version is the newest command and snapshot format this build understands.
// A format change that an older build would misread (a new field, a new op,
// a new state string) needs a new version; proposers must not write it until
// every node runs a build that understands it.
const Version = 1

// The states an agent reports, and two that only [State.Status] derives.
const (
	StateStarting     = "starting"
	StateStreaming    = "streaming"
	StateCatchingUp   = "catching-up"
	StatePaused       = "paused" // paused with an error the operator must fix; Error says it
	StateReconnecting = "reconnecting"
	StateSyncing      = "syncing" // `xdcr sync` is copying tables into the site; Error says how far
	StateDown         = "down"    // derived: no report for longer than the downAfter given to Status
	StateUnknown      = "unknown" // derived: never reported
)

// reportedStates are the states a report may carry.
var reportedStates = []string{StateStarting, StateStreaming, StateCatchingUp, StatePaused, StateReconnecting, StateSyncing}

// The ops of a [Command].
const (
	OpBootstrap = "bootstrap"
	OpSource    = "source"
	OpApplied   = "applied"
)

// witnessSite is the site name of voting-only Raft members; it is never a
// data site (internal/config reserves it too).
const witnessSite = "witness"

// Command is one entry of the Raft log. Exactly one payload is set, the one
// that Op names. Build commands with [Bootstrap.Command],
// [SourceReport.Command] and [AppliedReport.Command], which fill in Version
// and Op.
type Command struct {
	Version int    `json:"v"`
	Op      string `json:"op"`
	// At is the proposer's clock when it made the command; Apply records it
	// as the report time. Apply never reads the clock itself, so every node
	// computes the same state.
	At        time.Time       `json:"at"`
	Bootstrap *Bootstrap      `json:"bootstrap,omitempty"`
	Source    *SourceReport   `json:"source,omitempty"`
	Applied   *AppliedReport  `json:"applied,omitempty"`
	Promote   *Promote        `json:"promote,omitempty"`
	Fenced    *Fenced         `json:"fenced,omitempty"`
	Promoted  *Promoted       `json:"promoted,omitempty"`
	Abort     *AbortPromotion `json:"abort,omitempty"`
}

// Bootstrap creates the cluster's state: its name, its data sites and the
// primary of epoch 1.
type Bootstrap struct {
	Cluster string   `json:"cluster"`
	Primary string   `json:"primary"`
	Sites   []string `json:"sites"` // data sites (witness excluded); Primary must be one of them
}

// SourceReport is what the primary site's capture agent reports about once
// a second.
//
// A zero LSN or time means "not known": when the state already holds a
// report of the same site and epoch, it keeps that field's previous value.
// So an agent that has just (re)started can report its state before it
// knows its positions.
type SourceReport struct {
	Site  string `json:"site"`
	Epoch uint64 `json:"epoch"`
	// SentLSN is the position up to which capture has decoded the source's
	// WAL (the walsender's sent position): everything before it that
	// touches replicated tables is published or being published.
	SentLSN change.LSN `json:"sent_lsn"`
	// WALLSN is the source database's current WAL insert position
	// (pg_current_wal_insert_lsn(): with asynchronous commits the write
	// position, pg_current_wal_lsn(), can trail committed transactions).
	WALLSN change.LSN `json:"wal_lsn"`
	// LastCommitLSN and LastCommitTime are the commit LSN and commit time
	// (the source's clock) of the last transaction capture published.
	LastCommitLSN  change.LSN `json:"last_commit_lsn"`
	LastCommitTime time.Time  `json:"last_commit_time"`
	State          string     `json:"state"`
	Error          string     `json:"error,omitempty"`
}

// AppliedReport is what a replica site's apply agent reports about once a
// second. Zero LSN and times mean "not known", as in [SourceReport].
type AppliedReport struct {
	Site   string `json:"site"`
	Epoch  uint64 `json:"epoch"`  // epoch of the history applied (the origin's epoch)
	Origin string `json:"origin"` // the site whose history it is
	// LSN is the position up to which the site has applied everything: the
	// commit LSN of the last applied transaction, or the WAL position of a
	// heartbeat that said nothing was published after it.
	LSN change.LSN `json:"lsn"`
	// CommitTime is the source commit time of the last applied transaction.
	CommitTime time.Time `json:"commit_time"`
	// AsOf is the source-clock time up to which the site has applied
	// everything: the later of CommitTime and the time of the last
	// heartbeat it processed.
	AsOf  time.Time `json:"as_of"`
	State string    `json:"state"`
	Error string    `json:"error,omitempty"`
}

// Command returns the bootstrap command made at time at.
func (b Bootstrap) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpBootstrap, At: at, Bootstrap: &b}
}

// Command returns the source report command made at time at.
func (r SourceReport) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpSource, At: at, Source: &r}
}

// Command returns the applied report command made at time at.
func (r AppliedReport) Command(at time.Time) Command {
	return Command{Version: Version, Op: OpApplied, At: at, Applied: &r}
}

// EncodeCommand returns the bytes to put into the Raft log. A zero Version
// is written as [Version]; times are written in UTC. It refuses a command
// that [Command.Validate] refuses, so a proposer learns of a malformed
// command before it reaches the log.
func EncodeCommand(c Command) ([]byte, error) {
	if c.Version == 0 {
		c.Version = Version
	}
	c = c.normalized()
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("encode command: %w", err)
	}
	data, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode command: %w", err)
	}
	return data, nil
}

// DecodeCommand parses a Raft log entry written by [EncodeCommand]. It
// refuses versions other than 1..[Version] (ErrUnsupportedVersion), and
// with ErrInvalidCommand: data that is not one JSON object, unknown fields,
// and whatever [Command.Validate] refuses (unknown ops, missing payloads, …).
// Times come back in UTC.
func DecodeCommand(data []byte) (Command, error) {
	// Read the version first: a newer command may carry fields this build
	// does not know, and the version is the better reason to give.
	var head struct {
		V *int `json:"v"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return Command{}, fmt.Errorf("decode command: %w: %w", ErrInvalidCommand, err)
	}
	if head.V == nil {
		return Command{}, fmt.Errorf("decode command: no version (\"v\"): %w", ErrInvalidCommand)
	}
	if err := checkVersion("command", *head.V); err != nil {
		return Command{}, fmt.Errorf("decode command: %w", err)
	}
	var c Command
	if err := decodeStrict(data, &c); err != nil {
		return Command{}, fmt.Errorf("decode command: %w: %w", ErrInvalidCommand, err)
	}
	c = c.normalized()
	if err := c.Validate(); err != nil {
		return Command{}, fmt.Errorf("decode command: %w", err)
	}
	return c, nil
}

// Validate checks what can be checked without a state: the version, the
// op and its payload, names, epochs, state strings and times. It returns
// ErrUnsupportedVersion or ErrInvalidCommand. [State.Apply] calls it first.
func (c Command) Validate() error {
	if err := checkVersion("command", c.Version); err != nil {
		return err
	}
	if c.At.IsZero() {
		return fmt.Errorf("%s command has no time (at): %w", opName(c.Op), ErrInvalidCommand)
	}
	if err := checkTime("at", c.At); err != nil {
		return err
	}
	var payloads []string
	if c.Bootstrap != nil {
		payloads = append(payloads, OpBootstrap)
	}
	if c.Source != nil {
		payloads = append(payloads, OpSource)
	}
	if c.Applied != nil {
		payloads = append(payloads, OpApplied)
	}
	if c.Promote != nil {
		payloads = append(payloads, OpPromote)
	}
	if c.Fenced != nil {
		payloads = append(payloads, OpFenced)
	}
	if c.Promoted != nil {
		payloads = append(payloads, OpPromoted)
	}
	if c.Abort != nil {
		payloads = append(payloads, OpAbortPromotion)
	}
	switch c.Op {
	case OpBootstrap, OpSource, OpApplied, OpPromote, OpFenced, OpPromoted, OpAbortPromotion:
	default:
		return fmt.Errorf("unknown op %q (want %s, %s, %s, %s, %s, %s or %s): %w", c.Op,
			OpBootstrap, OpSource, OpApplied, OpPromote, OpFenced, OpPromoted, OpAbortPromotion, ErrInvalidCommand)
	}
	if len(payloads) != 1 || payloads[0] != c.Op {
		return fmt.Errorf("%s command carries payloads %v, want exactly %q: %w", c.Op, payloads, c.Op, ErrInvalidCommand)
	}
	switch c.Op {
	case OpBootstrap:
		return c.Bootstrap.validate()
	case OpSource:
		return c.Source.validate()
	case OpPromote:
		return c.Promote.validate()
	case OpFenced:
		return c.Fenced.validate()
	case OpPromoted:
		return c.Promoted.validate()
	case OpAbortPromotion:
		return c.Abort.validate()
	default:
		return c.Applied.validate()
	}
}

func (b *Bootstrap) validate() error {
	if b.Cluster == "" || !utf8.ValidString(b.Cluster) {
		return fmt.Errorf("bootstrap: cluster name %q: want a non-empty UTF-8 name: %w", b.Cluster, ErrInvalidCommand)
	}
	if len(b.Sites) == 0 {
		return fmt.Errorf("bootstrap of cluster %q: no data sites: %w", b.Cluster, ErrInvalidCommand)
	}
	seen := make(map[string]bool, len(b.Sites))
	for _, site := range b.Sites {
		switch {
		case site == "" || !utf8.ValidString(site):
			return fmt.Errorf("bootstrap of cluster %q: site name %q: want a non-empty UTF-8 name: %w", b.Cluster, site, ErrInvalidCommand)
		case site == witnessSite:
			return fmt.Errorf("bootstrap of cluster %q: %q is the voting-only member, not a data site: %w", b.Cluster, site, ErrInvalidCommand)
		case seen[site]:
			return fmt.Errorf("bootstrap of cluster %q: site %s listed twice: %w", b.Cluster, site, ErrInvalidCommand)
		}
		seen[site] = true
	}
	if !seen[b.Primary] {
		return fmt.Errorf("bootstrap of cluster %q: primary %q is not one of the sites %v: %w", b.Cluster, b.Primary, b.Sites, ErrInvalidCommand)
	}
	return nil
}

func (r *SourceReport) validate() error {
	what := "source report from " + quoteEmpty(r.Site)
	switch {
	case r.Site == "":
		return fmt.Errorf("%s: empty site name: %w", what, ErrInvalidCommand)
	case r.Epoch == 0:
		return fmt.Errorf("%s: epoch 0 (epochs start at 1): %w", what, ErrInvalidCommand)
	}
	if err := checkReportedState(what, r.State); err != nil {
		return err
	}
	return checkTime(what+": last_commit_time", r.LastCommitTime)
}

func (r *AppliedReport) validate() error {
	what := "applied report from " + quoteEmpty(r.Site)
	switch {
	case r.Site == "":
		return fmt.Errorf("%s: empty site name: %w", what, ErrInvalidCommand)
	case r.Origin == "":
		return fmt.Errorf("%s: empty origin: %w", what, ErrInvalidCommand)
	case r.Epoch == 0:
		return fmt.Errorf("%s: epoch 0 (epochs start at 1): %w", what, ErrInvalidCommand)
	}
	if err := checkReportedState(what, r.State); err != nil {
		return err
	}
	if err := checkTime(what+": commit_time", r.CommitTime); err != nil {
		return err
	}
	return checkTime(what+": as_of", r.AsOf)
}

// normalized returns c with every time in UTC (which also drops monotonic
// clock readings), sharing nothing with c.
func (c Command) normalized() Command {
	c.At = c.At.UTC()
	if c.Bootstrap != nil {
		b := *c.Bootstrap
		b.Sites = slices.Clone(b.Sites)
		c.Bootstrap = &b
	}
	if c.Source != nil {
		r := *c.Source
		r.LastCommitTime = r.LastCommitTime.UTC()
		c.Source = &r
	}
	if c.Applied != nil {
		r := *c.Applied
		r.CommitTime = r.CommitTime.UTC()
		r.AsOf = r.AsOf.UTC()
		c.Applied = &r
	}
	if c.Promote != nil {
		p := *c.Promote
		c.Promote = &p
	}
	if c.Fenced != nil {
		f := *c.Fenced
		f.Sequences = maps.Clone(f.Sequences)
		c.Fenced = &f
	}
	if c.Promoted != nil {
		p := *c.Promoted
		c.Promoted = &p
	}
	if c.Abort != nil {
		a := *c.Abort
		c.Abort = &a
	}
	return c
}

func checkVersion(what string, v int) error {
	if v < 1 || v > Version {
		return fmt.Errorf("%s version %d: this build understands 1 to %d: %w", what, v, Version, ErrUnsupportedVersion)
	}
	return nil
}

func checkReportedState(what, state string) error {
	if !slices.Contains(reportedStates, state) {
		return fmt.Errorf("%s: state %q is not one of %v: %w", what, state, reportedStates, ErrInvalidCommand)
	}
	return nil
}

// checkTime refuses times that JSON cannot carry (years outside 0..9999 in
// UTC), so that whatever is accepted can be encoded again.
func checkTime(what string, t time.Time) error {
	if y := t.UTC().Year(); y < 0 || y > 9999 {
		return fmt.Errorf("%s: year %d is out of range: %w", what, y, ErrInvalidCommand)
	}
	return nil
}

// decodeStrict decodes exactly one JSON value into v, refusing unknown
// fields and trailing data.
func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("data after the JSON object")
	}
	return nil
}

func opName(op string) string {
	if op == "" {
		return "(no op)"
	}
	return op
}

func quoteEmpty(s string) string {
	if s == "" {
		return `""`
	}
	return s
}
