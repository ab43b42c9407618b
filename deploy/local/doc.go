// Package local runs several xdcr sites on one machine: for each site a
// PostgreSQL cluster started from the server binaries and an in-process
// nats-server with JetStream. The tests, `xdcr dev`, `xdcr demo` and the
// benchmarks all build on it, so what they exercise is the topology we ship
// (docs/nats-topology.md), not a mock of it.
//
// The three building blocks:
//
//   - [Postgres] is one PostgreSQL cluster. [StartPostgres] copies a cached
//     initdb template into a new data directory (or reuses an existing one),
//     starts the postmaster in its own process group and waits until it
//     accepts connections. [Postgres.Stop], [Postgres.Kill] and
//     [Postgres.Start] let fault tests stop, crash and restart it on the same
//     directory and port. When the caller is root, initdb and postgres run as
//     the "postgres" OS user, because PostgreSQL refuses to run as root.
//   - [NATS] is one nats-server with JetStream, running inside the calling
//     process. [StartNATS] writes Dir/nats.conf with [RenderNATSConfig] and
//     loads that file, so the configuration that runs is the one on disk.
//     [NATS.Stop] and [NATS.Start] keep the store and the ports.
//   - [Sites] is N sites joined the way NATS-TOPOLOGY.md recommends: one
//     JetStream domain per site (the site name), leaf nodes in a full mesh
//     with exactly one connection per pair, and isolate_leafnode_interest on
//     every server.
//
// Everything listens on 127.0.0.1 only, on ports picked at start (unless the
// caller fixes them). Nothing here reads flags or environment variables
// except PATH (to find the PostgreSQL binaries) and os.TempDir (for the
// initdb template cache).
//
// A process that may die without calling Close still does not leak
// PostgreSQL servers: every postmaster is started with a parent-death signal
// (Linux), so it shuts down when the process that started it exits.
package local
