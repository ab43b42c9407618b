package agent

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/xdcr/xdcr/replicator"
	"github.com/xdcr/xdcr/transport"
)

// metrics are a node's Prometheus series. The per-site lag series come
// from the Raft state when scraped (see stateCollector).
type metrics struct {
	registry *prometheus.Registry

	publishedTxns prometheus.Counter
	publishedRows prometheus.Counter
	sentBytes     *prometheus.CounterVec
	appliedTxns   prometheus.Counter
	appliedRows   prometheus.Counter
	applyBatch    prometheus.Histogram
	errors        *prometheus.CounterVec
	retainedWAL   prometheus.Gauge
	dropped       prometheus.Counter
	syncRunning   prometheus.Gauge
	syncRows      *prometheus.GaugeVec
	syncRowsTotal *prometheus.GaugeVec
	syncBytes     *prometheus.GaugeVec
	cache         *cacheMetrics // cache.go

	// retainedWALExceeded is 1 while the slot retains more WAL than
	// capture.max_retained_wal (slotwarn.go)
	retainedWALExceeded prometheus.Gauge
}

func newMetrics(version string) *metrics {
	r := prometheus.NewRegistry()
	m := &metrics{
		registry: r,
		publishedTxns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xdcr_published_transactions_total",
			Help: "Source transactions the change stream acknowledged (primary site).",
		}),
		publishedRows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xdcr_published_rows_total",
			Help: "Row changes the change stream acknowledged (primary site).",
		}),
		sentBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xdcr_published_bytes_total",
			Help: `Bytes of the messages capture handed to the change stream (primary site): form="encoded" as encoded, form="sent" as sent and stored (compressed by capture.compression, or the same).`,
		}, []string{"form"}),
		appliedTxns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xdcr_applied_transactions_total",
			Help: "Source transactions applied to this site's database.",
		}),
		appliedRows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xdcr_applied_rows_total",
			Help: "Row changes applied to this site's database.",
		}),
		applyBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "xdcr_apply_batch_duration_seconds",
			Help:    "Time from queuing the first statement of a target transaction to its commit.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xdcr_pipeline_errors_total",
			Help: "Errors that stopped or restarted the pipeline, by kind.",
		}, []string{"kind"}),
		retainedWAL: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "xdcr_slot_retained_wal_bytes",
			Help: "WAL the replication slot keeps on the primary (pg_current_wal_insert_lsn() - restart_lsn).",
		}),
	}
	m.retainedWALExceeded = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "xdcr_slot_retained_wal_exceeded",
		Help: "1 while the replication slot retains more WAL than capture.max_retained_wal (primary site); the agent never drops the slot.",
	})
	m.dropped = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "xdcr_dropped_batches_total",
		Help: "Batches apply did not apply: an older epoch's, or not from the primary of the epoch it applies (fencing).",
	})
	m.syncRunning = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "xdcr_sync_running",
		Help: "1 while xdcr sync copies tables into this site (apply waits).",
	})
	m.syncRows = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "xdcr_sync_rows",
		Help: "Rows xdcr sync has copied into a table of this site.",
	}, []string{"table"})
	m.syncRowsTotal = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "xdcr_sync_rows_estimated",
		Help: "Rows xdcr sync expects to copy into a table (the primary's estimate).",
	}, []string{"table"})
	m.syncBytes = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "xdcr_sync_bytes",
		Help: "Bytes xdcr sync has copied into a table of this site.",
	}, []string{"table"})
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "xdcr_build_info",
		Help:        "The running xdcr version.",
		ConstLabels: prometheus.Labels{"version": version},
	})
	build.Set(1)
	r.MustRegister(m.publishedTxns, m.publishedRows, m.sentBytes, m.appliedTxns, m.appliedRows, m.applyBatch, m.errors,
		m.retainedWAL, m.retainedWALExceeded, m.dropped, m.syncRunning, m.syncRows, m.syncRowsTotal, m.syncBytes, build, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.cache = newCacheMetrics(r)
	m.sentBytes.WithLabelValues("encoded")
	m.sentBytes.WithLabelValues("sent")
	for _, k := range []string{"schema", "gap", "malformed", "slot", "permanent", "transient"} {
		m.errors.WithLabelValues(k)
	}
	return m
}

// errorKind classifies a pipeline error for xdcr_pipeline_errors_total.
func errorKind(err error) string {
	var (
		schema *replicator.SchemaError
		gap    *replicator.GapError
		perm   *replicator.PermanentError
	)
	switch {
	case errors.As(err, &schema):
		return "schema"
	case errors.As(err, &gap):
		return "gap"
	case errors.Is(err, transport.ErrMalformed):
		return "malformed"
	case errors.Is(err, replicator.ErrSlotLost):
		return "slot"
	case errors.As(err, &perm):
		return "permanent"
	}
	return "transient"
}

// observeSync shows the progress of a sync the apply waits for; a nil
// error means no sync runs.
func (m *metrics) observeSync(e *replicator.SyncingError) {
	if e == nil {
		m.syncRunning.Set(0)
		return
	}
	m.syncRunning.Set(1)
	for _, t := range e.Tables {
		m.syncRows.WithLabelValues(t.Table).Set(float64(t.RowsDone))
		m.syncRowsTotal.WithLabelValues(t.Table).Set(float64(t.RowsTotal))
		m.syncBytes.WithLabelValues(t.Table).Set(float64(t.BytesDone))
	}
}

func (m *metrics) observeApply(p replicator.ApplyProgress) {
	if p.Txns == 0 {
		return
	}
	m.appliedTxns.Add(float64(p.Txns))
	m.appliedRows.Add(float64(p.Changes))
	m.applyBatch.Observe(p.Duration.Seconds())
}

// observeSent counts a message capture handed to the change stream.
func (m *metrics) observeSent(encoded, sent int) {
	m.sentBytes.WithLabelValues("encoded").Add(float64(encoded))
	m.sentBytes.WithLabelValues("sent").Add(float64(sent))
}
