package agent

import (
	"fmt"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/xdcr/xdcr/internal/config"
	"github.com/xdcr/xdcr/replicator"
)

// walWarnEvery is how often the retained-WAL warning is logged again while
// the slot stays over capture.max_retained_wal.
const walWarnEvery = time.Minute

// retainedWALWarning returns the warning for a slot that retains more WAL
// than limit (capture.max_retained_wal), or "" when it does not or the
// warning is off.
func retainedWALWarning(cluster string, retained, limit int64) string {
	if limit == config.NoWALLimit || limit <= 0 || retained <= limit {
		return ""
	}
	return fmt.Sprintf("warning: replication slot %s retains %s of WAL on the primary, over capture.max_retained_wal (%s): "+
		"capture is behind or cannot publish, or a transaction stays open; the agent never drops the slot. "+
		"Find out why (xdcr lag, this agent's log); if PostgreSQL's max_slot_wal_keep_size invalidates the slot, "+
		"every replica must be re-seeded with `xdcr sync SITE`",
		replicator.SlotName(cluster), humanize.IBytes(uint64(retained)), humanize.IBytes(uint64(limit)))
}

// checkRetainedWAL sets xdcr_slot_retained_wal_exceeded and logs the
// warning when the slot crosses capture.max_retained_wal (again every
// walWarnEvery while it stays over), and a line when it is back under.
func (a *Agent) checkRetainedWAL(retained int64) {
	limit := a.cfg.Capture.MaxRetainedWAL
	warning := retainedWALWarning(a.cfg.Cluster, retained, limit)
	a.mu.Lock()
	last := a.walWarnedAt
	switch {
	case warning != "" && time.Since(last) >= walWarnEvery:
		a.walWarnedAt = time.Now()
	case warning == "" && !last.IsZero():
		a.walWarnedAt = time.Time{}
	}
	a.mu.Unlock()
	if warning != "" {
		a.metrics.retainedWALExceeded.Set(1)
		if time.Since(last) >= walWarnEvery {
			a.log.Warn("the replication slot retains too much WAL", "retained_bytes", retained, "max_retained_wal", limit, "warning", warning)
		}
		return
	}
	a.metrics.retainedWALExceeded.Set(0)
	if !last.IsZero() {
		a.log.Info("the replication slot's retained WAL is back under capture.max_retained_wal", "retained_bytes", retained, "max_retained_wal", limit)
	}
}
