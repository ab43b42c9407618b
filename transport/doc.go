// Package transport carries change batches between sites over NATS
// JetStream.
//
// It holds the versioned wire format of one JetStream message ([Encode],
// [Decode] and the message id [MsgID], specified byte by byte in
// docs/wire-format.md), and the JetStream side of the data path: setting up
// each site's stream and its mirrors of every possible primary's stream,
// publishing batches with a Nats-Msg-Id so republished ones are dropped as
// duplicates, and consuming them through a durable pull consumer.
//
// A message is one [change.Batch]: a run of whole source transactions, one
// chunk of a large transaction, or a heartbeat. Every message is
// self-contained: it names the relations its changes use, so a consumer can
// start at any message. Decoding is zero-copy for column values, which alias
// the message bytes.
package transport
