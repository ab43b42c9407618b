package chaos

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/xdcr/xdcr/internal/wait"
)

// The ledger's accounts: Accounts of them, each opened with Opening on
// every site before replication starts.
const (
	Accounts = 10
	Opening  = 1000
)

// Schema creates the workloads' tables, with the same opening balances, on
// every site.
var Schema = fmt.Sprintf(`
CREATE TABLE public.accounts (id int PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE public.transfers (
	id     text PRIMARY KEY,
	client int NOT NULL,
	src    int NOT NULL,
	dst    int NOT NULL,
	amount bigint NOT NULL
);
CREATE TABLE public.events (
	client int NOT NULL,
	seq    bigint NOT NULL,
	at     timestamptz NOT NULL DEFAULT clock_timestamp(),
	PRIMARY KEY (client, seq)
);
INSERT INTO public.accounts SELECT g, %d FROM generate_series(1, %d) g;
`, Opening, Accounts)

// Tables are the replicated tables of the workloads.
var Tables = []string{"public.accounts", "public.transfers", "public.events"}

// transferSQL moves $5 from account $3 to $4 and records it as transfer $1
// of client $2, in one statement: one transaction.
const transferSQL = `WITH t AS (
	INSERT INTO public.transfers (id, client, src, dst, amount) VALUES ($1, $2, $3, $4, $5)
), s AS (
	UPDATE public.accounts SET balance = balance - $5 WHERE id = $3
)
UPDATE public.accounts SET balance = balance + $5 WHERE id = $4`

// Outcome is what a client knows of a transaction it sent.
type Outcome int

const (
	// Refused: the server answered with an error; nothing committed.
	Refused Outcome = iota
	// Acked: the server acknowledged the commit.
	Acked
	// Unknown: the connection failed before an answer; it may have
	// committed.
	Unknown
)

// outcome classifies the result of an autocommitted statement. An ERROR
// aborts the transaction; a FATAL (the server ending the session) or a
// broken connection leaves the commit in doubt.
func outcome(err error) Outcome {
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		return Acked
	case errors.As(err, &pgErr) && pgErr.Severity == "ERROR":
		return Refused
	}
	return Unknown
}

// Transfer is one ledger transaction as its client sent it.
type Transfer struct {
	Client   int
	Src, Dst int
	Amount   int64
	Outcome  Outcome
	Site     string    // the site it was sent to (the primary as Raft named it)
	At       time.Time // when the client had its answer
}

// Dropped is a log row its client had acknowledged on Site at At, but that
// the next primary did not hold when the client moved there: it was lost
// in a forced failover, legitimately if it lies in the failover's loss
// window (see [LossWindow]), else a real loss.
type Dropped struct {
	Client int
	Seq    int64
	Site   string
	At     time.Time
}

// History is what the clients recorded: every transfer they sent and
// its outcome, for the log how far each client's acknowledged prefix
// goes and which acknowledged rows a failover dropped, and the loss
// windows of the forced failovers.
type History struct {
	mu        sync.Mutex
	transfers map[string]Transfer
	events    map[int]int64 // client -> highest acknowledged seq (1..n all acked)
	pending   map[int]bool  // client -> its next seq was sent without an answer
	dropped   []Dropped
	windows   []LossWindow
}

func newHistory() *History {
	return &History{transfers: map[string]Transfer{}, events: map[int]int64{}, pending: map[int]bool{}}
}

// drop records that client's acknowledged rows rows[i] (seq from+i) were
// not on the primary it moved to, and that its log goes on after seq
// from-1 there.
func (h *History) drop(client int, from int64, rows []ackedRow) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, r := range rows {
		h.dropped = append(h.dropped, Dropped{Client: client, Seq: from + int64(i), Site: r.site, At: r.at})
	}
	h.events[client] = from - 1
	h.pending[client] = false
}

// AddWindows records the loss windows of forced failovers, for the
// checkers.
func (h *History) AddWindows(ws ...LossWindow) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.windows = append(h.windows, ws...)
}

func (h *History) transfer(id string, t Transfer) {
	h.mu.Lock()
	h.transfers[id] = t
	h.mu.Unlock()
}

func (h *History) event(client int, seq int64, o Outcome) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch o {
	case Acked:
		h.events[client] = seq
		h.pending[client] = false
	case Unknown:
		h.pending[client] = true
	}
}

// Counts returns how many transfers were acknowledged and left in doubt,
// and how many log rows were acknowledged.
func (h *History) Counts() (acked, unknown, events int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, t := range h.transfers {
		switch t.Outcome {
		case Acked:
			acked++
		case Unknown:
			unknown++
		}
	}
	for _, n := range h.events {
		events += int(n)
	}
	return acked, unknown, events
}

// ackedBy counts the transfers site acknowledged from start on.
func (h *History) ackedBy(site string, start time.Time) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, t := range h.transfers {
		if t.Outcome == Acked && t.Site == site && !t.At.Before(start) {
			n++
		}
	}
	return n
}

// snapshot copies the history for the checkers.
func (h *History) snapshot() (map[string]Transfer, map[int]int64, map[int]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.transfers), maps.Clone(h.events), maps.Clone(h.pending)
}

// failovers copies the dropped log rows and the loss windows.
func (h *History) failovers() ([]Dropped, []LossWindow) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.dropped), slices.Clone(h.windows)
}

// PrimaryDSN names the database of the site that is the primary now.
type PrimaryDSN func(ctx context.Context) (site, dsn string, err error)

// clients run the ledger and log workloads until their context ends.
type clients struct {
	primary PrimaryDSN
	hist    *History
	op      time.Duration // bound on one statement
}

// run starts n clients of each workload and returns when ctx ends and all
// of them stopped.
func (c *clients) run(ctx context.Context, n int, seed uint64) {
	var wg sync.WaitGroup
	for i := 1; i <= n; i++ {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		wg.Add(2)
		go func() { defer wg.Done(); c.ledger(ctx, i, rng) }()
		go func() { defer wg.Done(); c.log(ctx, i) }()
	}
	wg.Wait()
}

// session keeps a client's connection to the primary, reconnecting after
// any failure.
type session struct {
	c    *clients
	conn *pgx.Conn
	site string // the site conn is to
}

func (s *session) get(ctx context.Context) *pgx.Conn {
	if s.conn != nil {
		return s.conn
	}
	site, dsn, err := s.c.primary(ctx)
	if err != nil {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, s.c.op)
	defer cancel()
	conn, err := pgx.Connect(cctx, dsn)
	if err != nil {
		return nil
	}
	s.conn, s.site = conn, site
	return conn
}

func (s *session) drop() {
	if s.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.conn.Close(ctx)
		s.conn = nil
	}
}

func (s *session) exec(ctx context.Context, sql string, args ...any) (Outcome, error) {
	conn := s.get(ctx)
	if conn == nil {
		return Refused, errors.New("no connection to the primary")
	}
	octx, cancel := context.WithTimeout(ctx, s.c.op)
	defer cancel()
	_, err := conn.Exec(octx, sql, args...)
	o := outcome(err)
	if err != nil {
		s.drop()
	}
	return o, err
}

// ledger sends transfers as client id until ctx ends. A transfer is never
// sent twice: after an unknown outcome the next one has a new id.
func (c *clients) ledger(ctx context.Context, id int, rng *rand.Rand) {
	s := &session{c: c}
	defer s.drop()
	for n := 1; ctx.Err() == nil; n++ {
		if s.get(ctx) == nil {
			_ = wait.Sleep(ctx, 100*time.Millisecond)
			n--
			continue
		}
		t := Transfer{Client: id, Src: rng.IntN(Accounts) + 1, Amount: rng.Int64N(50) + 1}
		t.Dst = (t.Src+rng.IntN(Accounts-1))%Accounts + 1 // never Src
		tid := fmt.Sprintf("c%d-%d", id, n)
		t.Site = s.site
		o, err := s.exec(ctx, transferSQL, tid, id, t.Src, t.Dst, t.Amount)
		t.Outcome, t.At = o, time.Now()
		c.hist.transfer(tid, t)
		if err != nil {
			_ = wait.Sleep(ctx, 50*time.Millisecond)
			continue
		}
		_ = wait.Sleep(ctx, 2*time.Millisecond)
	}
}

// ackedRow is where and when a client's log row was acknowledged.
type ackedRow struct {
	site string
	at   time.Time
}

// log appends client id's rows 1, 2, 3, … one transaction each, waiting
// for every acknowledgement. A row in doubt is sent again: the primary key
// refuses it if the first attempt committed, which settles the doubt.
//
// When the primary moves to another site, the client first asks the new
// one how far its log goes there: after a forced failover the rows the old
// primary acknowledged last may be missing (the loss window). Those are
// recorded as dropped, for the checker to tell a loss the failover allows
// from a real one, and the log goes on from the new primary's last row.
func (c *clients) log(ctx context.Context, id int) {
	s := &session{c: c}
	defer s.drop()
	var acked []ackedRow // acked[i]: row i+1
	on := ""             // the site the log was last written to
	for seq := int64(1); ctx.Err() == nil; {
		if s.get(ctx) == nil {
			_ = wait.Sleep(ctx, 100*time.Millisecond)
			continue
		}
		if on != "" && on != s.site {
			held, err := s.lastSeq(ctx, id)
			if err != nil {
				_ = wait.Sleep(ctx, 50*time.Millisecond)
				continue
			}
			if n := int64(len(acked)); held < n {
				c.hist.drop(id, held+1, acked[held:])
				acked, seq = acked[:held], held+1
			}
		}
		on = s.site
		o, err := s.exec(ctx, `INSERT INTO public.events (client, seq) VALUES ($1, $2)`, id, seq)
		var pgErr *pgconn.PgError
		if o == Refused && errors.As(err, &pgErr) && pgErr.Code == "23505" {
			o = Acked // an earlier attempt in doubt had committed
		}
		if ctx.Err() != nil && o != Acked {
			o = Unknown // cancelled in flight
		}
		c.hist.event(id, seq, o)
		if o == Acked {
			acked = append(acked, ackedRow{site: s.site, at: time.Now()})
			seq++
			_ = wait.Sleep(ctx, 2*time.Millisecond)
			continue
		}
		_ = wait.Sleep(ctx, 50*time.Millisecond)
	}
}

// lastSeq returns the highest seq of client id's log on the session's
// site.
func (s *session) lastSeq(ctx context.Context, id int) (int64, error) {
	conn := s.get(ctx)
	if conn == nil {
		return 0, errors.New("no connection to the primary")
	}
	octx, cancel := context.WithTimeout(ctx, s.c.op)
	defer cancel()
	var n int64
	err := conn.QueryRow(octx, `SELECT coalesce(max(seq), 0) FROM public.events WHERE client = $1`, id).Scan(&n)
	if err != nil {
		s.drop()
		return 0, fmt.Errorf("read client %d's last row: %w", id, err)
	}
	return n, nil
}
