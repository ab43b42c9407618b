package bench

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/xdcr/xdcr/replicator"
)

// hold keeps an agent's pipeline from starting while its process runs:
// the agent is restarted while the benchmark holds a lock its pipeline
// takes before it reads or writes anything, so a timed catch-up starts
// with a running agent (as native's starts with a running server) rather
// than with a process start and a Raft rejoin.
type hold struct {
	conn *pgx.Conn
	tx   pgx.Tx // the capture hold's transaction; nil for the apply hold
}

// release lets the held pipeline go on at once.
func (h *hold) release(ctx context.Context) error {
	if h == nil || h.conn == nil {
		return nil
	}
	var err error
	if h.tx != nil {
		err = h.tx.Rollback(ctx)
	} else {
		_, err = h.conn.Exec(ctx, "SELECT pg_advisory_unlock_all()")
	}
	err = errors.Join(err, h.conn.Close(ctx))
	h.conn, h.tx = nil, nil
	return err
}

// holdCapture stops the capture agent while a backlog is built; arm
// restarts it held. The agent is not restarted at once: its held session
// waits with a snapshot open, which would keep the source from pruning
// dead rows while the backlog is written (pgbench then slows to a crawl
// and leaves bloated tables to both systems).
func (e *env) holdCapture(ctx context.Context) (*hold, error) {
	if err := e.stopAgent(ctx, e.primary); err != nil {
		return nil, err
	}
	return &hold{}, nil
}

// armCapture restarts the capture agent while the source's
// xdcr.capture_state is locked: its capture session waits on its first
// read of that table, before it opens the replication connection.
func (e *env) armCapture(ctx context.Context, h *hold) error {
	conn, err := pgx.Connect(ctx, e.src)
	if err != nil {
		return err
	}
	tx, err := conn.Begin(ctx)
	if err == nil {
		_, err = tx.Exec(ctx, "LOCK TABLE xdcr.capture_state IN ACCESS EXCLUSIVE MODE")
	}
	h.conn, h.tx = conn, tx
	if err != nil {
		return fmt.Errorf("hold capture: %w", err)
	}
	return e.restartBlocked(ctx, e.primary, e.src, "xdcr", "relation")
}

// holdApply restarts the apply agent while the replica's advisory lock
// on xdcr's schema is held: the agent waits before it fences the site's
// tables (or, were they fenced already another way, before its apply
// session reads its position), so nothing is applied until the release.
func (e *env) holdApply(ctx context.Context) (*hold, error) {
	conn, err := pgx.Connect(ctx, e.xdst)
	if err != nil {
		return nil, err
	}
	h := &hold{conn: conn}
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", replicator.SchemaLock); err != nil {
		return nil, errors.Join(fmt.Errorf("hold apply: %w", err), h.release(context.WithoutCancel(ctx)))
	}
	if err := e.restartBlocked(ctx, e.replica, e.xdst, "xdcr%", "advisory"); err != nil {
		return nil, errors.Join(err, h.release(context.WithoutCancel(ctx)))
	}
	return h, nil
}

// restartBlocked restarts node's agent and waits until a session of it
// (application_name LIKE app) waits on a lock of the given kind in dsn.
func (e *env) restartBlocked(ctx context.Context, node, dsn, app, event string) error {
	if err := e.stopAgent(ctx, node); err != nil {
		return err
	}
	if err := e.c.StartAgent(ctx, node); err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE application_name LIKE $1 AND wait_event_type = 'Lock' AND wait_event = $2`, app, event).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
		if exited, err := e.c.AgentExited(node); exited {
			return fmt.Errorf("agent %s exited (%v); see %s", node, err, e.c.LogPath(node))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent %s did not reach its held lock within 2 minutes; see %s", node, e.c.LogPath(node))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
