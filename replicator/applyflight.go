package replicator

import (
	"time"
)

// A group in flight. commitGroup hands a group of whole transactions to a
// goroutine that sends it and waits for the replica to run it, and
// returns at once. While the replica runs the group, the applier reads and
// arranges the next one; that work and the replica's used to take turns,
// and in a catch-up the replica's backend waited for the agent about a
// third of the time (docs/performance.md). At most one group is in flight,
// and the connection still carries one command at a time: everything that
// uses it, from sending the next group to preparing a statement, first
// settles the group in flight. Its position counts as applied, and is
// reported, only once it has committed. A group that fails stops the
// applier: every later group would move the position from where the
// failed one should have left it, so nothing more is sent and the session
// ends with the group's error.

// sentGroup is a group of whole transactions sent to the replica.
type sentGroup struct {
	queued []stmt // its statements, until it lands
	parts  []part
	head   AppliedPosition // the position once it commits

	txns, changes int // what it applies, for the report
	started       time.Time

	done chan struct{} // closed once the replica answered; err is set then
	err  error
}

// settle waits for the group in flight, if any, and takes in its result:
// its position becomes the applied one. Once a group failed it returns
// that group's error, now and ever after.
func (w *applier) settle() error {
	g := w.flight
	if g == nil {
		return w.failed
	}
	<-g.done
	w.flight = nil
	clear(g.queued)
	w.spareQueue = g.queued[:0]
	if g.err != nil {
		w.failed = g.err
		return g.err
	}
	w.committed(g.head, g.txns, g.changes, g.started)
	return nil
}

// land waits for the group in flight, if any, without taking in its
// result: the session is ending, and the next one reads the position from
// the replica.
func (w *applier) land() {
	if g := w.flight; g != nil {
		<-g.done
	}
}
