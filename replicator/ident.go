package replicator

import (
	"strings"

	"github.com/jackc/pgx/v5"
)

// Table names a replicated table.
type Table struct {
	Schema, Name string
}

// Quoted is the SQL form, both parts quoted: "public"."accounts".
func (t Table) Quoted() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }

// String is schema.table, for messages.
func (t Table) String() string { return t.Schema + "." + t.Name }

// SlotName is the logical replication slot a cluster's capture owns.
func SlotName(cluster string) string {
	return "xdcr_" + strings.ReplaceAll(cluster, "-", "_")
}

// PublicationName is the publication that lists a cluster's tables.
func PublicationName(cluster string) string { return SlotName(cluster) }
