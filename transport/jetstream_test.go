package transport

import (
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/xdcr/xdcr/deploy/local"
	"github.com/xdcr/xdcr/replicator/change"
)

// natsSites starts NATS-only local sites for a test.
func natsSites(t *testing.T, n int) (*local.Sites, []jetstream.JetStream) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts NATS servers")
	}
	sites, err := local.StartSites(t.Context(), local.SitesConfig{Names: local.SiteNames(n), Dir: t.TempDir(), NoPostgres: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sites.Close() })
	var js []jetstream.JetStream
	for _, s := range sites.List {
		nc, err := nats.Connect(s.NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		j, err := jetstream.New(nc, jetstream.WithPublishAsyncTimeout(10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		js = append(js, j)
	}
	return sites, js
}

func runBatch(origin string, lsns ...change.LSN) *change.Batch {
	rel := &change.Relation{Schema: "public", Name: "t", Identity: change.IdentityDefault,
		Columns: []change.Column{{Name: "id", Type: "integer", TypeOID: 23, Key: true}}}
	b := &change.Batch{Origin: origin, Epoch: 1}
	prev := change.LSN(0)
	for _, l := range lsns {
		b.Txns = append(b.Txns, change.Txn{Xid: uint32(l), LSN: l, PrevLSN: prev, CommitTime: time.Unix(1, 0).UTC(),
			Changes: []change.Change{{Op: change.Insert, Rel: rel, New: []change.Value{{Kind: change.Text, Data: []byte("1")}}}}})
		prev = l
	}
	return b
}

func waitAck(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("no acknowledgement")
		return nil
	}
}

// publishAll publishes batches and waits for every acknowledgement.
func publishAll(t *testing.T, pub *Publisher, batches []*change.Batch) {
	t.Helper()
	var acks []<-chan error
	for _, b := range batches {
		done, err := pub.Publish(t.Context(), b)
		if err != nil {
			t.Fatal(err)
		}
		acks = append(acks, done)
	}
	for _, a := range acks {
		if err := waitAck(t, a); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStreamsPublishSubscribe: streams and mirrors are set up idempotently,
// a batch published in dc-a arrives decoded through dc-b's mirror, and a
// subscription resumes after a given sequence.
func TestStreamsPublishSubscribe(t *testing.T) {
	sites, js := natsSites(t, 3)
	ctx := t.Context()
	names := sites.Names()
	settings := StreamSettings{MaxAge: time.Hour, DuplicateWindow: time.Minute}
	for round := 0; round < 2; round++ { // the second round finds everything in place
		for i, site := range names {
			if err := EnsureStreams(ctx, js[i], "shop", site, names, settings); err != nil {
				t.Fatalf("round %d, site %s: %v", round, site, err)
			}
		}
	}
	pub := NewPublisher(js[0], "shop", "dc-a")
	if last, err := pub.Resume(ctx, 1); err != nil || last != nil {
		t.Fatalf("resume on an empty stream: %v, %v", last, err)
	}
	var batches []*change.Batch
	for i := range 5 {
		batches = append(batches, runBatch("dc-a", change.LSN(100*i+10), change.LSN(100*i+20)))
	}
	publishAll(t, pub, batches)
	mirror, err := js[1].Stream(ctx, StreamName("shop", "dc-a"))
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		info, err := mirror.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.State.LastSeq == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dc-b's mirror holds %d of 5 messages", info.State.LastSeq)
		}
		time.Sleep(50 * time.Millisecond)
	}
	sub := NewSubscriber(js[1])
	msgs, stop, err := sub.Subscribe(ctx, StreamName("shop", "dc-a"), 2)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for want := uint64(3); want <= 5; want++ {
		select {
		case d := <-msgs:
			if d.Err != nil || d.Seq != want || d.Batch.FirstLSN() != change.LSN(100*(want-1)+10) {
				t.Fatalf("got seq %d err %v first %s, want seq %d", d.Seq, d.Err, d.Batch.FirstLSN(), want)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("seq %d never arrived through dc-b's mirror", want)
		}
	}
	if _, _, err := sub.Subscribe(ctx, StreamName("shop", "dc-a"), 99); !errors.Is(err, ErrStreamBehind) {
		t.Fatalf("subscribe past the end: got %v, want ErrStreamBehind", err)
	}
}

// TestPublisherRefusesGaps: once the stream holds something the publisher
// did not expect (here a foreign message), its publishes are refused until
// Resume, which skips the foreign message and finds the last batch.
func TestPublisherRefusesGaps(t *testing.T) {
	for _, c := range []Compression{CompressNone, CompressZstd} {
		t.Run(string(c), func(t *testing.T) { testPublisherRefusesGaps(t, c) })
	}
}

func testPublisherRefusesGaps(t *testing.T, c Compression) {
	sites, js := natsSites(t, 2)
	ctx := t.Context()
	for i, site := range sites.Names() {
		if err := EnsureStreams(ctx, js[i], "shop", site, sites.Names(), StreamSettings{DuplicateWindow: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	pub := NewPublisher(js[0], "shop", "dc-a")
	if err := pub.Compress(c); err != nil {
		t.Fatal(err)
	}
	if _, err := pub.Resume(ctx, 1); err != nil {
		t.Fatal(err)
	}
	done, err := pub.Publish(ctx, runBatch("dc-a", 10))
	if err != nil || waitAck(t, done) != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := js[0].Publish(ctx, Subject("shop", "dc-a"), []byte("junk")); err != nil {
		t.Fatal(err)
	}
	done, err = pub.Publish(ctx, runBatch("dc-a", 20))
	if err != nil {
		t.Fatal(err)
	}
	if err := waitAck(t, done); err == nil {
		t.Fatal("a publish after a foreign message was stored; want it refused (wrong last sequence)")
	}
	last, err := pub.Resume(ctx, 1)
	if err != nil || last == nil || last.LastLSN() != 10 {
		t.Fatalf("resume: got %v, %v; want the batch ending at LSN 10", last, err)
	}
	done, err = pub.Publish(ctx, runBatch("dc-a", 20))
	if err != nil || waitAck(t, done) != nil {
		t.Fatalf("publish after resume: %v", err)
	}
	// a chunk published again after a restart is not dropped as a duplicate
	chunk := func() *change.Batch {
		b := runBatch("dc-a", 30)
		b.Txns[0].PrevLSN = 20
		b.Chunk = &change.Chunk{Index: 0}
		return b
	}
	for range 2 {
		if _, err := pub.Resume(ctx, 1); err != nil {
			t.Fatal(err)
		}
		done, err := pub.Publish(ctx, chunk())
		if err != nil || waitAck(t, done) != nil {
			t.Fatalf("publish chunk: %v", err)
		}
	}
}

// TestSubscriberBoundsBytes: a reader that does not keep up finds only as
// many decoded messages waiting as fit in Subscriber.Decoded, counted
// decompressed, and then every message, in order.
func TestSubscriberBoundsBytes(t *testing.T) {
	for _, c := range []Compression{CompressNone, CompressZstd} {
		t.Run(string(c), func(t *testing.T) { testSubscriberBoundsBytes(t, c) })
	}
}

func testSubscriberBoundsBytes(t *testing.T, c Compression) {
	sites, js := natsSites(t, 1)
	ctx := t.Context()
	names := sites.Names()
	if err := EnsureStreams(ctx, js[0], "shop", names[0], names, StreamSettings{MaxAge: time.Hour, DuplicateWindow: time.Minute}); err != nil {
		t.Fatal(err)
	}
	pub := NewPublisher(js[0], "shop", names[0])
	if err := pub.Compress(c); err != nil {
		t.Fatal(err)
	}
	if _, err := pub.Resume(ctx, 1); err != nil {
		t.Fatal(err)
	}
	const msgs, size = 30, 300 << 10
	big := make([]byte, size)
	for i := range big {
		big[i] = 'a' + byte(i%26)
	}
	var batches []*change.Batch
	for i := range msgs {
		b := runBatch(names[0], change.LSN(100*i+10))
		b.Txns[0].Changes[0].New[0].Data = big
		if i > 0 {
			b.Txns[0].PrevLSN = change.LSN(100*(i-1) + 10)
		}
		batches = append(batches, b)
	}
	publishAll(t, pub, batches)
	sub := NewSubscriber(js[0])
	sub.Decoded = 1 << 20
	out, stop, err := sub.Subscribe(ctx, StreamName("shop", names[0]), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	time.Sleep(500 * time.Millisecond)
	if n := len(out); n < 1 || n > 3 {
		t.Fatalf("%d messages of %d KiB wait for the reader, want 1 to 3 (1 MiB)", n, size>>10)
	}
	for want := uint64(1); want <= msgs; want++ {
		select {
		case d := <-out:
			if d.Err != nil || d.Seq != want || d.Batch.FirstLSN() != change.LSN(100*(want-1)+10) {
				t.Fatalf("got seq %d err %v, want seq %d", d.Seq, d.Err, want)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("seq %d never arrived", want)
		}
	}
}

// TestPublisherCompresses: with zstd, a message of rows is stored
// compressed, arrives through the mirror decoded to the batch published
// with its decompressed size, and Resume reads it back.
func TestPublisherCompresses(t *testing.T) {
	sites, js := natsSites(t, 2)
	ctx := t.Context()
	names := sites.Names()
	for i, site := range names {
		if err := EnsureStreams(ctx, js[i], "shop", site, names, StreamSettings{DuplicateWindow: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	pub := NewPublisher(js[0], "shop", "dc-a")
	if err := pub.Compress(CompressZstd); err != nil {
		t.Fatal(err)
	}
	var sent [][2]int
	pub.Sent = func(encoded, stored int) { sent = append(sent, [2]int{encoded, stored}) }
	if _, err := pub.Resume(ctx, 3); err != nil {
		t.Fatal(err)
	}
	want := rowsBatch(5000)
	plain := mustEncode(t, want)
	publishAll(t, pub, []*change.Batch{want, runBatch("dc-a", 0x2000)})
	st, err := js[0].Stream(ctx, StreamName("shop", "dc-a"))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := st.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if raw.Data[len(magic)+1] != flagCompressed || len(raw.Data) > len(plain)/2 {
		t.Fatalf("stored %d bytes with flags %#x for a %d-byte message; want it compressed", len(raw.Data), raw.Data[len(magic)+1], len(plain))
	}
	small := mustEncode(t, runBatch("dc-a", 0x2000))
	if want := [][2]int{{len(plain), len(raw.Data)}, {len(small), len(small)}}; !reflect.DeepEqual(sent, want) {
		t.Errorf("Sent saw %v, want %v", sent, want)
	}
	out, stop, err := NewSubscriber(js[1]).Subscribe(ctx, StreamName("shop", "dc-a"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	select {
	case d := <-out:
		if d.Err != nil {
			t.Fatal(d.Err)
		}
		if !reflect.DeepEqual(d.Batch, want) {
			t.Fatalf("got %s\nwant %s", dump(d.Batch), dump(want))
		}
		if d.Size != len(plain)-trailerLen {
			t.Errorf("Size = %d, want the decompressed %d", d.Size, len(plain)-trailerLen)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the compressed message never arrived through dc-b's mirror")
	}
	// Resume passes over the last message (a run of epoch 1) and reads
	// the compressed one of epoch 3
	if last, err := pub.Resume(ctx, 3); err != nil || !reflect.DeepEqual(last, want) {
		t.Fatalf("resume: %v, %v", last, err)
	}
	if err := pub.Compress("lz4"); err == nil {
		t.Error("Compress(lz4) succeeded")
	}
}
