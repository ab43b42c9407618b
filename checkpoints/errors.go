package checkpoints

import "errors"

// Errors of [State.Apply], [DecodeCommand], [EncodeCommand] and
// [RestoreSnapshot]. The returned errors wrap one (rarely two) of these and
// say which site, which field, and the old and new values; test them with
// errors.Is.
var (
	// ErrNotBootstrapped: a report arrived before the cluster was
	// bootstrapped. Bootstrap first.
	ErrNotBootstrapped = errors.New("cluster not bootstrapped")
	// ErrAlreadyBootstrapped: a bootstrap arrived for the cluster that is
	// already bootstrapped. Harmless: nodes that race to bootstrap get it,
	// and the state is the first bootstrap's.
	ErrAlreadyBootstrapped = errors.New("already bootstrapped")
	// ErrClusterMismatch: a bootstrap names another cluster than the one
	// the state holds. Not harmless: the node is configured for another
	// cluster, or joined the wrong Raft group.
	ErrClusterMismatch = errors.New("cluster name mismatch")
	// ErrUnknownSite: a report names a site (or origin) that is not one of
	// the bootstrapped data sites.
	ErrUnknownSite = errors.New("unknown site")
	// ErrNotPrimary: a source report from a site that is not the primary of
	// the current epoch, or an applied report of the current epoch whose
	// origin is not the current primary.
	ErrNotPrimary = errors.New("not the primary")
	// ErrNotReplica: an applied report from the primary site.
	ErrNotReplica = errors.New("not a replica")
	// ErrStaleEpoch: a report of an epoch older than the current one (source
	// reports) or than the site's last accepted report (applied reports).
	// A source agent that gets it must stop publishing: it has been fenced.
	ErrStaleEpoch = errors.New("stale epoch")
	// ErrFutureEpoch: a report of an epoch newer than the current one.
	ErrFutureEpoch = errors.New("future epoch")
	// ErrRegression: a position moved backwards within an epoch (and
	// origin).
	ErrRegression = errors.New("position moved backwards")
	// ErrUnsupportedVersion: a command or snapshot of a format version this
	// build does not understand (newer than [Version], or 0). A node that
	// gets it from the Raft log must stop rather than skip the entry: the
	// other nodes may have applied it, and skipping would make the states
	// diverge. Upgrade the node.
	ErrUnsupportedVersion = errors.New("unsupported version")
	// ErrInvalidCommand: a command that is malformed on its own, whatever
	// the state: an unknown op, a missing or extra payload, an empty name,
	// a state string that is not one of the reported states, a zero time.
	ErrInvalidCommand = errors.New("invalid command")
	// ErrInvalidSnapshot: snapshot data that does not parse or describes an
	// impossible state.
	ErrInvalidSnapshot = errors.New("invalid snapshot")
	// ErrEpochMoved: a promote expected an epoch the cluster has left (a
	// racing promote won, or the request is stale).
	ErrEpochMoved = errors.New("epoch moved")
	// ErrPromotionInProgress: a promote while another promotion runs.
	ErrPromotionInProgress = errors.New("promotion in progress")
	// ErrNoPromotion: a promotion report for a promotion that is not in
	// progress, or not in the phase the report belongs to.
	ErrNoPromotion = errors.New("no such promotion in progress")
)
