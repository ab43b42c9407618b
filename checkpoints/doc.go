// Package checkpoints is the replicated state that xdcr's Raft group orders:
// the cluster's data sites, the primary and its epoch, the primary's latest
// WAL positions, and every replica's applied position. Lag is computed from
// it ([State.Status]).
//
// The package is pure, deterministic logic. It does no I/O, never reads the
// clock inside [State.Apply] (every time comes from the command), and does
// not import raft: package consensus wraps a [State] in a raft.FSM.
//
// # Commands
//
// Agents report through Raft about once a second. A [Command] carries one
// payload:
//
//   - [Bootstrap]: the cluster name, its data sites and the primary of
//     epoch 1. Nodes that race to bootstrap all propose it; the first wins
//     and the others get [ErrAlreadyBootstrapped], which is harmless
//     ([ErrClusterMismatch] is not).
//   - [SourceReport]: the primary's capture agent: how far it has decoded
//     the source's WAL (SentLSN), the source's WAL insert position (WALLSN),
//     and the commit LSN and time of the last transaction it published.
//   - [AppliedReport]: a replica's apply agent: the position up to which it
//     has applied the history of an origin and epoch, and AsOf, the
//     source-clock time up to which that is complete.
//
// Commands are JSON with a format version "v" ([Version]).
// [EncodeCommand] writes them and [DecodeCommand] reads them back; both
// refuse a malformed command ([Command.Validate]), and DecodeCommand refuses
// versions it does not know and fields it does not know. A new field, op or
// state string needs a new version, and proposers must not use it before
// every node understands it: an older node would refuse the entry while the
// others apply it.
//
//	data, err := checkpoints.EncodeCommand(checkpoints.AppliedReport{
//		Site: "dc-b", Epoch: 1, Origin: "dc-a", LSN: lsn,
//		CommitTime: commitTime, AsOf: asOf, State: checkpoints.StateStreaming,
//	}.Command(time.Now()))
//
// # Rules
//
// [State.Apply] validates every command against the state and leaves the
// state unchanged when it refuses one; the error wraps one of the
// package's sentinels (ErrStaleEpoch, ErrRegression, …) and names the site
// and the values involved. Positions never move backwards within an epoch,
// only the primary of the current epoch reports as the source, and reports
// of an older epoch are refused — so a fenced old primary learns it is
// fenced from the error (ErrStaleEpoch). A zero LSN or time in a report
// means "not known" and keeps the previous value.
//
// What the FSM adapter should do with Apply's error: return it as the log
// entry's response (the proposer reads it), except ErrUnsupportedVersion,
// which means this node is older than the one that wrote the entry; it must
// stop instead of skipping the entry, or its state would diverge.
//
// # Snapshots
//
// [State.MarshalSnapshot] writes the whole state as versioned JSON;
// [RestoreSnapshot] reads it back, refusing newer versions and states that
// Apply could not have built. A State is not safe for concurrent use: the
// adapter serialises Apply with its readers and gives snapshots a
// [State.Clone].
//
// # Lag
//
// [State.Status] is what `xdcr lag -o json` prints and /v1/status serves:
// per site its role, state, applied LSN, lag in bytes and seconds, and the
// time of its last report. docs/lag.md defines every value and explains
// the clock-skew caveat of lag_seconds.
package checkpoints
