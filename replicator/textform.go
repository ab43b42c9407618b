package replicator

import "maps"

// TextSettings returns the session settings under which PostgreSQL writes
// values in the same text form as the change stream carries them
// (DateStyle, IntervalStyle, extra_float_digits, bytea_output, TimeZone):
// cache keys built from a query's col::text then equal the keys built from
// change records.
func TextSettings() map[string]string { return maps.Clone(sessionParams) }
