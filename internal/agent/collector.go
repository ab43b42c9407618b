package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/xdcr/xdcr/replicator/change"
)

// stateCollector exports the Raft state (per-site lag, epoch) and this
// node's Raft membership when scraped. A follower's copy of the state may
// trail the leader's by a moment.
type stateCollector struct {
	a *Agent
}

var (
	descLagSeconds = prometheus.NewDesc("xdcr_replication_lag_seconds",
		"How far behind in time the site's applied history is (0 when caught up).", []string{"site"}, nil)
	descLagBytes = prometheus.NewDesc("xdcr_replication_lag_bytes",
		"Source WAL decoded by capture minus the site's applied position (on the primary: WAL not yet decoded).", []string{"site"}, nil)
	descApplied = prometheus.NewDesc("xdcr_applied_lsn_bytes",
		"The site's applied position as a number (the primary's: decoded position).", []string{"site"}, nil)
	descSiteState = prometheus.NewDesc("xdcr_site_state",
		"1 for the state each site is in.", []string{"site", "role", "state"}, nil)
	descEpoch     = prometheus.NewDesc("xdcr_epoch", "The current epoch (fencing token).", nil, nil)
	descRaftState = prometheus.NewDesc("xdcr_raft_state",
		"1 for this node's Raft state.", []string{"state"}, nil)
	descRaftLeader = prometheus.NewDesc("xdcr_raft_leader", "1 when this node is the Raft leader.", nil, nil)
	descRaftTerm   = prometheus.NewDesc("xdcr_raft_term", "This node's Raft term.", nil, nil)
	descRaftCommit = prometheus.NewDesc("xdcr_raft_commit_index", "This node's Raft commit index.", nil, nil)
	descRaftApply  = prometheus.NewDesc("xdcr_raft_applied_index", "This node's Raft applied index.", nil, nil)
	descRaftLast   = prometheus.NewDesc("xdcr_raft_last_contact_seconds",
		"Time since this node last heard from the leader (0 on the leader).", nil, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLagSeconds, descLagBytes, descApplied, descSiteState, descEpoch,
		descRaftState, descRaftLeader, descRaftTerm, descRaftCommit, descRaftApply, descRaftLast} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.a.raft.LocalState()
	if st.Bootstrapped() {
		status := st.Status(time.Now().UTC(), downAfter)
		ch <- prometheus.MustNewConstMetric(descEpoch, prometheus.GaugeValue, float64(status.Epoch))
		for _, s := range status.Sites {
			ch <- prometheus.MustNewConstMetric(descSiteState, prometheus.GaugeValue, 1, s.Site, s.Role, s.State)
			if s.LagSeconds != nil {
				ch <- prometheus.MustNewConstMetric(descLagSeconds, prometheus.GaugeValue, *s.LagSeconds, s.Site)
			}
			if s.LagBytes != nil {
				ch <- prometheus.MustNewConstMetric(descLagBytes, prometheus.GaugeValue, float64(*s.LagBytes), s.Site)
			}
			if lsn, err := change.ParseLSN(s.AppliedLSN); err == nil {
				ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(lsn), s.Site)
			}
		}
	}
	rs := c.a.raft.Stats()
	for _, state := range []string{"Leader", "Follower", "Candidate", "Shutdown"} {
		v := 0.0
		if rs.State == state {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descRaftState, prometheus.GaugeValue, v, state)
	}
	leader := 0.0
	if c.a.raft.IsLeader() {
		leader = 1
	}
	ch <- prometheus.MustNewConstMetric(descRaftLeader, prometheus.GaugeValue, leader)
	ch <- prometheus.MustNewConstMetric(descRaftTerm, prometheus.GaugeValue, float64(rs.Term))
	ch <- prometheus.MustNewConstMetric(descRaftCommit, prometheus.GaugeValue, float64(rs.CommitIndex))
	ch <- prometheus.MustNewConstMetric(descRaftApply, prometheus.GaugeValue, float64(rs.AppliedIndex))
	ch <- prometheus.MustNewConstMetric(descRaftLast, prometheus.GaugeValue, rs.LastContact.Seconds())
}
