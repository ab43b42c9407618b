package agent

import (
	"errors"

	"github.com/xdcr/xdcr/replicator"
)

// observer receives the pipeline's events: it keeps the latest position
// for the reporter and feeds the metrics.
type observer struct{ a *Agent }

var _ replicator.Observer = (*observer)(nil)

func (o *observer) State(state string, err error) {
	o.a.setPipeline(func(p *pipelineState) { p.state, p.err = state, err })
	var syncing *replicator.SyncingError
	if errors.As(err, &syncing) {
		o.a.metrics.observeSync(syncing)
		return
	}
	o.a.metrics.observeSync(nil)
	if err != nil {
		o.a.metrics.errors.WithLabelValues(errorKind(err)).Inc()
	}
}

func (o *observer) Source(sp replicator.SourceProgress) {
	o.a.setPipeline(func(p *pipelineState) { p.source = sp })
	o.a.metrics.retainedWAL.Set(float64(sp.RetainedWALBytes))
	o.a.checkRetainedWAL(sp.RetainedWALBytes)
}

func (o *observer) Published(txns, changes int) {
	o.a.metrics.publishedTxns.Add(float64(txns))
	o.a.metrics.publishedRows.Add(float64(changes))
}

func (o *observer) Applied(ap replicator.ApplyProgress) {
	o.a.setPipeline(func(p *pipelineState) {
		p.applied = &ap
		p.catchUp = ap.CatchingUp
	})
	o.a.metrics.observeApply(ap)
	if ap.Txns > 0 {
		o.a.cache.wake() // the commit may have queued invalidations
	}
}

func (o *observer) Dropped(origin string, epoch uint64) {
	o.a.metrics.dropped.Inc()
	o.a.log.Warn("dropped a batch of another epoch or origin", "origin", origin, "epoch", epoch)
}
