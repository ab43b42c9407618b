package replicator

import (
	"time"

	"github.com/xdcr/xdcr/replicator/change"
)

// Observer receives what a pipeline does, for checkpoints, metrics and
// status. Its methods are called from the pipeline's goroutine and must not
// block.
type Observer interface {
	// State reports a change of the pipeline's state (one of the State
	// constants) and the error that caused it, if any.
	State(state string, err error)
	// Source reports capture's position, about once per status interval.
	Source(p SourceProgress)
	// Published reports a batch the stream acknowledged.
	Published(txns, changes int)
	// Applied reports apply's position after every target commit and
	// every heartbeat it processed.
	Applied(p ApplyProgress)
	// Dropped reports a batch that apply did not apply because it belongs
	// to an older epoch or to a site that is not the primary of the epoch
	// being applied (a fenced primary's late messages, injected ones).
	Dropped(origin string, epoch uint64)
}

// SourceProgress is where capture stands.
type SourceProgress struct {
	// SentLSN is how far the walsender has decoded the WAL for capture:
	// every transaction that commits before it has been received.
	SentLSN change.LSN
	// WALLSN is the database's current WAL insert position.
	WALLSN change.LSN
	// LastCommitLSN and LastCommitTime describe the last transaction that
	// the stream acknowledged.
	LastCommitLSN  change.LSN
	LastCommitTime time.Time
	// RetainedWALBytes is how much WAL the slot keeps on the primary.
	RetainedWALBytes int64
}

// ApplyProgress is where apply stands.
type ApplyProgress struct {
	// Position is the committed position (origin, epoch, commit LSN).
	Position AppliedPosition
	// UpTo is the source WAL position up to which the replica has applied
	// everything: the last commit LSN, or a later heartbeat's WAL position
	// when the heartbeat says nothing was published in between.
	UpTo change.LSN
	// AsOf is the source time up to which the replica has applied
	// everything: the last commit time, or a later heartbeat's time.
	AsOf time.Time
	// CatchingUp is set while messages wait behind the last commit.
	CatchingUp bool
	// Txns and Changes were committed by this target transaction (0 for a
	// heartbeat), in Duration.
	Txns, Changes int
	Duration      time.Duration
}

// NopObserver ignores everything; embed it to implement part of Observer.
type NopObserver struct{}

func (NopObserver) State(string, error)    {}
func (NopObserver) Source(SourceProgress)  {}
func (NopObserver) Published(int, int)     {}
func (NopObserver) Applied(ApplyProgress)  {}
func (NopObserver) Dropped(string, uint64) {}
