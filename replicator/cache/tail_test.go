package cache

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/replicator/change"
	"github.com/xdcr/xdcr/transport"
)

// jsStream is the tail's stream over JetStream, as the agent wires it.
type jsStream struct {
	*transport.Subscriber
	js jetstream.JetStream
}

func (s jsStream) LastSeq(ctx context.Context, name string) (uint64, error) {
	st, err := s.js.Stream(ctx, name)
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}

// primary is a site's own change stream with a publisher on it.
type primary struct {
	t      *testing.T
	js     jetstream.JetStream
	pub    *transport.Publisher
	stream string
	lsn    change.LSN
}

func newPrimary(t *testing.T, cluster string) *primary {
	t.Helper()
	nc := natsConn(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := transport.EnsureStreams(t.Context(), js, cluster, "dc-a", []string{"dc-a"},
		transport.StreamSettings{DuplicateWindow: time.Minute}); err != nil {
		t.Fatal(err)
	}
	p := &primary{t: t, js: js, pub: transport.NewPublisher(js, cluster, "dc-a"), stream: transport.StreamName(cluster, "dc-a"), lsn: 0x1000000}
	if _, err := p.pub.Resume(t.Context(), 1); err != nil {
		t.Fatal(err)
	}
	return p
}

// publish sends one batch of one transaction.
func (p *primary) publish(changes ...change.Change) {
	p.t.Helper()
	p.lsn += 0x100
	b := &change.Batch{Origin: "dc-a", Epoch: 1, Txns: []change.Txn{{Xid: 1, LSN: p.lsn, CommitTime: time.Now().UTC(), Changes: changes}}}
	done, err := p.pub.Publish(p.t.Context(), b)
	if err == nil {
		err = <-done
	}
	if err != nil {
		p.t.Fatal(err)
	}
}

func (p *primary) heartbeat() {
	p.t.Helper()
	done, err := p.pub.Publish(p.t.Context(), &change.Batch{Origin: "dc-a", Epoch: 1, Heartbeat: &change.Heartbeat{WALEnd: p.lsn, LastLSN: p.lsn, Time: time.Now()}})
	if err == nil {
		err = <-done
	}
	if err != nil {
		p.t.Fatal(err)
	}
}

func deleteAccount(id string) change.Change {
	return change.Change{Op: change.Delete, Rel: accounts, Old: []change.Value{txt(id), nullv, nullv}}
}

// TestTail: the primary's own cache is invalidated from its own stream,
// from where the tail started, and a restarted tail goes on where it
// stopped.
func TestTail(t *testing.T) {
	f := newFixture(t, "redis")
	p := newPrimary(t, f.cluster)
	for _, k := range []string{"account:1", "account:2", "account:3", "account:4"} {
		f.client.set(k, "cached")
	}
	p.publish(deleteAccount("1")) // before the tail ever ran: not its business

	w := f.worker(t, WorkerConfig{})
	log, logs := testLogger(t)
	newTail := func() *Tail {
		return NewTail(TailConfig{Cluster: f.cluster, Site: "dc-a", DSN: f.dsn, Stream: p.stream},
			jsStream{transport.NewSubscriber(p.js), p.js}, f.keys, w.Wake, log)
	}
	if err := newTail().Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	position := func() int64 {
		return queryInt(t, f.dsn, "SELECT stream_seq FROM xdcr.cache_position WHERE cluster = $1 AND stream = $2", f.cluster, p.stream)
	}
	if got := position(); got != 1 {
		t.Fatalf("Init: position %d, want 1 (the end of the stream)", got)
	}
	if err := newTail().Init(t.Context()); err != nil || position() != 1 {
		t.Fatalf("a second Init moved the position: %v, %d", err, position())
	}
	runWorker(t, w)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- newTail().Run(ctx) }()
	p.publish(deleteAccount("2"))
	p.heartbeat()
	eventually(t, 10*time.Second, "account:2 to be invalidated", func() bool { return !f.client.exists("account:2") })
	// the heartbeat moves it too when it came in the same group
	eventually(t, 10*time.Second, "the position to move", func() bool { return position() >= 2 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}

	// written while the tail is down: picked up after the restart
	p.publish(deleteAccount("3"))
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	go func() { done <- newTail().Run(ctx) }()
	eventually(t, 10*time.Second, "account:3 to be invalidated", func() bool { return !f.client.exists("account:3") })
	eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
	if !f.client.exists("account:1") {
		t.Error("a change published before the tail's first start was invalidated")
	}
	if !f.client.exists("account:4") {
		t.Error("an unchanged row's key was deleted")
	}
	if strings.Contains(logs.String(), "level=WARN") {
		t.Errorf("warnings:\n%s", logs)
	}
}

// TestTailStreamBehind: a stream that lost what the tail had read means
// unknown changes: every cached table is flushed.
func TestTailStreamBehind(t *testing.T) {
	f := newFixture(t, "redis")
	p := newPrimary(t, f.cluster)
	f.client.set("account:9", "cached")
	f.client.set("session:1", "cached")
	execSQL(t, f.dsn, "INSERT INTO xdcr.cache_position (cluster, stream, stream_seq) VALUES ($1, $2, 500)", f.cluster, p.stream)
	w := f.worker(t, WorkerConfig{})
	runWorker(t, w)
	log, logs := testLogger(t)
	runWorker(t, NewTail(TailConfig{Cluster: f.cluster, Site: "dc-a", DSN: f.dsn, Stream: p.stream},
		jsStream{transport.NewSubscriber(p.js), p.js}, f.keys, w.Wake, log))
	eventually(t, 10*time.Second, "the flush", func() bool { return !f.client.exists("account:9") })
	if !f.client.exists("session:1") {
		t.Error("a key of no template was flushed")
	}
	if !strings.Contains(logs.String(), "ends before the cache tail's position") {
		t.Errorf("no warning:\n%s", logs)
	}
	p.publish(deleteAccount("9"))
	eventually(t, 10*time.Second, "the position to follow the stream", func() bool {
		return queryInt(t, f.dsn, "SELECT stream_seq FROM xdcr.cache_position WHERE cluster = $1", f.cluster) == 1
	})
}

// TestTailOnePerSite: a second tail of the same site stands by while the
// first runs, and takes over when it stops.
func TestTailOnePerSite(t *testing.T) {
	f := newFixture(t, "redis")
	p := newPrimary(t, f.cluster)
	w := f.worker(t, WorkerConfig{})
	runWorker(t, w)
	log, logs := testLogger(t)
	newTail := func() *Tail {
		return NewTail(TailConfig{Cluster: f.cluster, Site: "dc-a", DSN: f.dsn, Stream: p.stream},
			jsStream{transport.NewSubscriber(p.js), p.js}, f.keys, w.Wake, log)
	}
	if err := newTail().Init(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- newTail().Run(ctx) }()
	f.client.set("account:1", "cached")
	p.publish(deleteAccount("1"))
	eventually(t, 10*time.Second, "the first tail to invalidate", func() bool { return !f.client.exists("account:1") })

	runWorker(t, newTail()) // the second
	eventually(t, 10*time.Second, "the second tail to stand by", func() bool {
		return strings.Contains(logs.String(), "standing by")
	})
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	f.client.set("account:2", "cached")
	p.publish(deleteAccount("2"))
	eventually(t, 20*time.Second, "the second tail to take over", func() bool { return !f.client.exists("account:2") })
	eventually(t, 10*time.Second, "the outbox to drain", func() bool { return f.outboxRows(t) == 0 })
}
