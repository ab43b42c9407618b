package verify

import "strings"

// Key is a row's key: the text form of each key column, in key order, as
// PostgreSQL prints it with the session settings of [sessionParams].
type Key []string

// String is the key for people: the value itself for a one-column key,
// and a PostgreSQL row literal for a composite one: (42,"a b").
func (k Key) String() string {
	if len(k) == 1 {
		return k[0]
	}
	var b strings.Builder
	b.WriteByte('(')
	for i, v := range k {
		if i > 0 {
			b.WriteByte(',')
		}
		writeRecordField(&b, v)
	}
	b.WriteByte(')')
	return b.String()
}

// writeRecordField quotes v as PostgreSQL's record output does.
func writeRecordField(b *strings.Builder, v string) {
	quote := v == ""
	for _, r := range v {
		if r == '"' || r == '\\' || r == '(' || r == ')' || r == ',' || r == ' ' || r == '\t' || r == '\n' || r == '\r' || r == '\f' || r == '\v' {
			quote = true
			break
		}
	}
	if !quote {
		b.WriteString(v)
		return
	}
	b.WriteByte('"')
	for _, r := range v {
		if r == '"' || r == '\\' {
			b.WriteRune(r)
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
}

// id is a map key for k. Text values cannot hold NUL, so joining on it is
// unambiguous.
func (k Key) id() string { return strings.Join(k, "\x00") }

// Range is the half-open key range [From, To). A nil bound is unbounded.
type Range struct {
	From, To Key
}

// split cuts r at the given keys, which must lie inside r in ascending
// order: n points give n+1 ranges that together cover r.
func (r Range) split(points []Key) []Range {
	out := make([]Range, 0, len(points)+1)
	from := r.From
	for _, p := range points {
		out = append(out, Range{From: from, To: p})
		from = p
	}
	return append(out, Range{From: from, To: r.To})
}

// KeyRange is a [Range] in a report: From inclusive, To exclusive, both in
// the form of [Key.String]; null is unbounded.
type KeyRange struct {
	From *string `json:"from"`
	To   *string `json:"to"`
}

func (r Range) report() KeyRange {
	var kr KeyRange
	if r.From != nil {
		s := r.From.String()
		kr.From = &s
	}
	if r.To != nil {
		s := r.To.String()
		kr.To = &s
	}
	return kr
}

// String is "[from, to)" with "…" for an unbounded end.
func (r KeyRange) String() string {
	from, to := "…", "…"
	if r.From != nil {
		from = *r.From
	}
	if r.To != nil {
		to = *r.To
	}
	return "[" + from + ", " + to + ")"
}
