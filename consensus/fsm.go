package consensus

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/raft"

	"github.com/xdcr/xdcr/checkpoints"
)

// fsm adapts a *checkpoints.State to [raft.FSM]. Raft calls Apply, Snapshot
// and Restore from its one FSM goroutine; readers (LocalState, ConsistentState)
// take copies under mu.
type fsm struct {
	mu     sync.Mutex
	state  *checkpoints.State
	halted error // non-nil: an entry could not be applied by this build; apply nothing more

	// changed is called, outside mu, after an applied command or a restore
	// changed the primary or the epoch. It must not block.
	changed func()
	// halt is called once, outside mu, when the FSM halts. It must not block
	// (raft's FSM goroutine calls it).
	halt func(error)
}

var _ raft.FSM = (*fsm)(nil)

func newFSM(changed func(), halt func(error)) *fsm {
	return &fsm{state: checkpoints.New(), changed: changed, halt: halt}
}

// Apply decodes and applies one committed command. The result is the FSM's
// verdict, handed back to the proposer through ApplyFuture.Response: nil, or
// the error that rejected the command (the state is then unchanged). The error
// value itself travels, so errors.Is works on the leader that proposed it.
//
// A rejection is deterministic, the same on every node, except one: an entry
// of a format version this build does not know (checkpoints.
// ErrUnsupportedVersion), which newer nodes may have applied. Skipping it
// would make this node's state diverge, so the FSM halts instead: it applies
// nothing more and refuses to snapshot, and the node shuts raft down. The
// state is in memory only and rebuilt from snapshot and log at start, so an
// upgraded build replays the entry and goes on.
func (f *fsm) Apply(l *raft.Log) any {
	f.mu.Lock()
	if f.halted != nil {
		defer f.mu.Unlock()
		return f.halted
	}
	primary, epoch := f.state.Primary, f.state.Epoch
	cmd, err := checkpoints.DecodeCommand(l.Data)
	if err == nil {
		err = f.state.Apply(cmd)
	}
	moved := f.state.Primary != primary || f.state.Epoch != epoch
	halted := errors.Is(err, checkpoints.ErrUnsupportedVersion)
	if halted {
		err = fmt.Errorf("raft log entry %d: %w", l.Index, err)
		f.halted = err
	}
	f.mu.Unlock()
	switch {
	case halted:
		f.halt(err)
		return err
	case err != nil:
		return err
	case moved:
		f.changed()
	}
	return nil
}

// Snapshot marshals the state right away: it is small, and Apply may run
// again while raft persists the snapshot. A halted FSM has no snapshot to
// give: its state misses entries that raft counts as applied.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.halted != nil {
		return nil, fmt.Errorf("no snapshot of a halted state: %w", f.halted)
	}
	b, err := f.state.MarshalSnapshot()
	if err != nil {
		return nil, fmt.Errorf("marshal snapshot: %w", err)
	}
	return fsmSnapshot(b), nil
}

// Restore replaces the whole state with the snapshot's, in one step: a
// snapshot that does not decode leaves the old state in place. raft closes rc.
func (f *fsm) Restore(rc io.ReadCloser) error {
	b, err := io.ReadAll(rc)
	if err != nil {
		return fmt.Errorf("read snapshot: %w", err)
	}
	s, err := checkpoints.RestoreSnapshot(b)
	if err != nil {
		return fmt.Errorf("restore snapshot: %w", err)
	}
	f.mu.Lock()
	if f.halted != nil {
		defer f.mu.Unlock()
		return f.halted
	}
	moved := s.Primary != f.state.Primary || s.Epoch != f.state.Epoch
	f.state = s
	f.mu.Unlock()
	if moved {
		f.changed()
	}
	return nil
}

// clone returns a copy of the current state.
func (f *fsm) clone() *checkpoints.State {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state.Clone()
}

// fsmSnapshot is a marshalled state.
type fsmSnapshot []byte

func (s fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		return fmt.Errorf("write snapshot: %w", errors.Join(err, sink.Cancel()))
	}
	return sink.Close()
}

func (s fsmSnapshot) Release() {}
