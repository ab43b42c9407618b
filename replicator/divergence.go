package replicator

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator/change"
)

// UnconsumedTxns decodes, without consuming them, the transactions that
// the capture's slot still holds: everything the site committed after the
// slot's confirmed position, published or not. An old primary that comes
// back after a failover reads its divergence from here. It returns nil
// when the slot does not exist.
func UnconsumedTxns(ctx context.Context, dsn, cluster string) ([]change.Txn, error) {
	conn, err := ConnectMeta(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND NOT active)`,
		SlotName(cluster)).Scan(&exists); err != nil {
		return nil, fmt.Errorf("read replication slot %s: %w", SlotName(cluster), err)
	}
	if !exists {
		return nil, nil
	}
	rows, err := conn.Query(ctx, `SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
		'proto_version', '1', 'publication_names', $2)`, SlotName(cluster), PublicationName(cluster))
	if err != nil {
		return nil, fmt.Errorf("read what replication slot %s holds: %w", SlotName(cluster), err)
	}
	// collect first: the decoder queries type names over the same connection
	msgs, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil {
		return nil, fmt.Errorf("read what replication slot %s holds: %w", SlotName(cluster), err)
	}
	dec := newDecoder(typeNames{conn})
	var (
		txns []change.Txn
		cur  *change.Txn
	)
	for _, m := range msgs {
		ev, err := dec.decode(ctx, m)
		if err != nil {
			return nil, err
		}
		switch ev.kind {
		case evBegin:
			t := ev.begin
			cur = &t
		case evChange:
			if cur == nil {
				return nil, errors.New("a change outside a transaction")
			}
			cur.Changes = append(cur.Changes, ev.change)
		case evCommit:
			if cur != nil && len(cur.Changes) > 0 {
				txns = append(txns, *cur)
			}
			cur = nil
		}
	}
	return txns, nil
}

// DropSlot drops the capture's slot if it exists (and is not in use): a
// site that is no longer the primary must not keep WAL for it.
func DropSlot(ctx context.Context, dsn, cluster string) (bool, error) {
	conn, err := ConnectMeta(ctx, dsn)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	tag, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
		WHERE slot_name = $1 AND database = current_database() AND NOT active`, SlotName(cluster))
	if err != nil {
		return false, fmt.Errorf("drop replication slot %s: %w", SlotName(cluster), err)
	}
	return tag.RowsAffected() > 0, nil
}

// KeyOf renders the identity of a change's row for reports: column name to
// text value.
func KeyOf(c *change.Change) map[string]string {
	vals := c.Old
	if vals == nil {
		vals = c.New
	}
	out := map[string]string{}
	if c.Rel == nil {
		return out
	}
	for i, col := range c.Rel.Columns {
		if !col.Key || i >= len(vals) {
			continue
		}
		switch v := vals[i]; v.Kind {
		case change.Null:
			out[col.Name] = "NULL"
		case change.Text, change.Binary:
			out[col.Name] = string(v.Data)
		}
	}
	return out
}
