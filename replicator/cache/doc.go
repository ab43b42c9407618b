// Package cache invalidates each site's own caches from the site's own
// replica; caches never sync between datacenters. docs/cache.md is the
// design; in short:
//
//   - [Keys] turns row changes into the cache keys they make stale, from the
//     key templates of the config ("account:{id}"). Apply calls it inside
//     every target transaction and writes the result into
//     xdcr.cache_outbox, committed with the data.
//   - [Tail] does the same for the primary site, which applies nothing: it
//     follows the site's own change stream and writes the outbox rows
//     together with its stream position.
//   - [Worker] drains the outbox after the commits: it deletes the keys
//     from the site's Redis or memcached ([Backend], chosen by the URL
//     scheme), publishes them as [Event]s on the site's NATS subject
//     xdcr.<cluster>.cache.<site>, and only then deletes the rows — at
//     least once. A cache that is down leaves the rows waiting (bounded:
//     an overflowing backlog collapses into a flush of the tables it
//     touched) and never stops replication.
//   - [Rebuild] drops and re-warms a site's keys from the site's own rows
//     (`xdcr cache rebuild`).
//
// The package imports nothing of the transport: the agent plugs NATS in
// through the small interfaces it declares.
package cache
