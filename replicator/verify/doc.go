// Package verify compares each replica's copy of the replicated tables with
// the primary's, row by row, without locking either side, while the
// primary keeps taking writes.
//
// Per table it compares a hash of the whole table first; on a mismatch it
// hashes key-range chunks, splits the chunks that differ until they are
// small, fetches (key, md5) of the rows of those small ranges from both
// sides, and names the missing, extra and different rows. A difference is
// reported only once it is confirmed at a position the replica has
// provably reached: docs/verify.md has the method and the argument.
//
// [Run] is the one entry point; `xdcr verify` wires it to the config and
// prints its [Report].
package verify
