// Package consensus runs one node of the cluster's single Raft group
// (github.com/hashicorp/raft): it opens the node's durable state (a bbolt log
// and stable store, file snapshots), bootstraps the group the first time and
// only then, carries Raft's RPCs over TCP or TLS (streamlayer.go), and applies
// the committed log to a [checkpoints.State] through a thin FSM adapter.
//
// A [Node] is opened with [Open] and stopped with [Node.Close]. Writes go
// through [Node.Apply] on the leader; a follower gets [ErrNotLeader] and the
// caller forwards to [Node.Leader] (the agent does that over the nodes' HTTP
// API). Reads that decisions depend on use [Node.ConsistentState]
// (VerifyLeader + Barrier); [Node.LocalState] may be stale.
//
// Why one group across sites, the timeouts, bootstrap-once semantics and how to
// replace a lost node are in docs/consensus.md.
package consensus
