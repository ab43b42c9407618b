// Package chaos tries hard to break DESIGN.md's guarantees on one machine
// with real processes, the way Jepsen-style suites do: workloads whose
// clients record what the database acknowledged, nemeses that kill,
// pause, restart and partition the parts of a local cluster
// (deploy/local, deploy/topology, deploy/faults), and checkers that turn
// what every site holds into counts of lost and doubled transactions and
// of consistent-prefix violations.
//
// Workloads (both write to whichever site Raft names the primary, and
// follow it):
//
//   - ledger: clients move money between accounts; each transfer inserts a
//     row with a client-unique id and updates two balances in one
//     transaction. After healing, every site must hold every acknowledged
//     transfer, no transfer that was refused, a constant sum of balances,
//     and balances that equal the sum of their transfers (an update applied
//     twice, or lost, breaks it).
//   - log: each client appends rows with strictly increasing sequence
//     numbers, one per transaction, waiting for each acknowledgement. On
//     every replica, each client's rows must be a gap-free prefix 1..n at
//     every sample taken while faults are active, and n never goes back.
//
// The third check is the row-by-row comparison of every table with the
// primary (topology checksums) once the cluster has healed.
//
// A forced failover (nemesis partition-primary) may lose what the old
// primary committed after the last transaction the new primary applied
// (DESIGN.md, Failover). The clients write to the old primary's database
// directly, so they are told of commits that are then lost. A
// [LossWindow] records, from the old primary's own WAL, which
// transactions those were; the checkers excuse a missing acknowledged
// transaction only if it is one of them (and was acknowledged by the old
// primary after the window began), count it apart, and count any other
// as lost. The log clients, on moving to a new primary, go on from the
// last row it holds.
//
// `make test` runs a short schedule (every nemesis once); `make chaos
// DURATION=10m SEED=N` runs a long random one and prints the summary;
// `make chaos-bigtxn` replicates one 1 GiB transaction.
package chaos
