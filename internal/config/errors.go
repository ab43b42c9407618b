package config

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// FieldError is one problem in the configuration: the path of the key, what
// is wrong with it, and how to fix it.
//
// [Parse] and [Config.Validate] return every problem at once, as
// errors.Join of *FieldError values, so callers can list them with
// errors.As or by unwrapping the joined error. Problem and Fix never contain
// a password (connection strings go through [RedactDSN]) nor a value that
// came from the environment.
type FieldError struct {
	// Path names the key, e.g. "sites.dc-b.postgres", "tables[1]" or
	// "cache.public.accounts[0]". It is empty for a problem with the file as
	// a whole.
	Path string
	// Line is the 1-based line of the key in the file, or 0 when unknown
	// (always 0 from Validate, which has no file).
	Line int
	// Problem says what is wrong.
	Problem string
	// Fix says how to fix it.
	Fix string
}

// Error formats the problem as "path: problem (line N); fix: fix".
func (e *FieldError) Error() string {
	var b strings.Builder
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Problem)
	if e.Line > 0 {
		fmt.Fprintf(&b, " (line %d)", e.Line)
	}
	if e.Fix != "" {
		b.WriteString("; fix: ")
		b.WriteString(e.Fix)
	}
	return b.String()
}

// SyntaxError means the file is not well-formed YAML, so no key could be
// checked. It wraps the YAML parser's error.
type SyntaxError struct {
	Line int    // 1-based, 0 when the parser did not say
	Msg  string // the parser's message without its "yaml: line N:" prefix
	Fix  string
	Err  error // the parser's error
}

func (e *SyntaxError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("line %d: invalid YAML: %s; fix: %s", e.Line, e.Msg, e.Fix)
	}
	return fmt.Sprintf("invalid YAML: %s; fix: %s", e.Msg, e.Fix)
}

func (e *SyntaxError) Unwrap() error { return e.Err }

var yamlErrPrefix = regexp.MustCompile(`^yaml: (?:line (\d+): )?`)

// yamlParserProblems are the messages of the YAML parser (as opposed to its
// scanner). For these, go.yaml.in/yaml/v3 reports the 0-based line where
// the enclosing block or flow collection starts, and no line for the first
// line; scanner errors carry the right 1-based line.
var yamlParserProblems = map[string]bool{
	"did not find expected <stream-start>":   true,
	"did not find expected <document start>": true,
	"found undefined tag handle":             true,
	"did not find expected node content":     true,
	"did not find expected '-' indicator":    true,
	"did not find expected key":              true,
	"did not find expected ',' or ']'":       true,
	"did not find expected ',' or '}'":       true,
	"found duplicate %YAML directive":        true,
	"found incompatible YAML document":       true,
	"found duplicate %TAG directive":         true,
}

// newSyntaxError turns an error of the YAML parser into a *SyntaxError.
func newSyntaxError(err error, data []byte) *SyntaxError {
	msg := err.Error()
	line := 0
	if m := yamlErrPrefix.FindStringSubmatch(msg); m != nil {
		if m[1] != "" {
			line, _ = strconv.Atoi(m[1])
		}
		msg = msg[len(m[0]):]
	}
	if yamlParserProblems[msg] {
		line++
	}
	fix := "check the indentation and quoting of the file"
	if line > 0 {
		fix = "check the indentation and quoting on that line and the lines around it"
	}
	switch text := lineOf(data, line); {
	case bytes.ContainsRune(data, '\t') && (line == 0 || bytes.ContainsRune(text, '\t')):
		fix = "indent with spaces: YAML does not allow tabs for indentation"
	case line > 0 && bytes.Contains(text, []byte("${")):
		fix = `quote values that contain ${VAR} inside { } or [ ], e.g. {raft: "${HOST}:7000"}`
	}
	return &SyntaxError{Line: line, Msg: msg, Fix: fix, Err: err}
}

// lineOf returns the 1-based line n of data.
func lineOf(data []byte, n int) []byte {
	for i := 1; i < n; i++ {
		j := bytes.IndexByte(data, '\n')
		if j < 0 {
			return nil
		}
		data = data[j+1:]
	}
	if j := bytes.IndexByte(data, '\n'); j >= 0 {
		return data[:j]
	}
	return data
}

// joinFieldErrors returns nil for no errors and errors.Join of them
// otherwise.
func joinFieldErrors(errs []*FieldError) error {
	if len(errs) == 0 {
		return nil
	}
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = e
	}
	return errors.Join(out...)
}

// sortByLine orders errors by line; errors without a line keep their
// relative order and go last.
func sortByLine(errs []*FieldError) {
	sort.SliceStable(errs, func(i, j int) bool {
		li, lj := errs[i].Line, errs[j].Line
		if li == 0 || lj == 0 {
			return li != 0 && lj == 0
		}
		return li < lj
	})
}

// joinPath appends a mapping key to a path. Keys with characters other than
// letters, digits, '_', '-', '.' and '$' are quoted, so a path stays
// readable and unambiguous.
func joinPath(path, key string) string {
	seg := pathKey(key)
	if path == "" {
		return seg
	}
	return path + "." + seg
}

func pathKey(key string) string {
	if key == "" {
		return `""`
	}
	for _, r := range key {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("_-.$", r)) {
			return strconv.Quote(key)
		}
	}
	return key
}

// indexPath appends a list index to a path: tables[2].
func indexPath(path string, i int) string {
	return path + "[" + strconv.Itoa(i) + "]"
}

// parentPath strips the last segment of a path ("" when there is none).
func parentPath(path string) string {
	if strings.HasSuffix(path, "]") {
		if i := strings.LastIndexByte(path, '['); i >= 0 {
			return path[:i]
		}
	}
	if strings.HasSuffix(path, `"`) && len(path) >= 2 {
		// A quoted key: find its opening quote.
		for i := len(path) - 2; i >= 0; i-- {
			if path[i] == '"' && (i == 0 || path[i-1] == '.') {
				if i == 0 {
					return ""
				}
				return path[:i-1]
			}
		}
	}
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		return path[:i]
	}
	return ""
}

// underPath reports whether path is p or lies below it.
func underPath(path, p string) bool {
	if p == "" || path == p {
		return true
	}
	return strings.HasPrefix(path, p) && (path[len(p)] == '.' || path[len(p)] == '[')
}

// suggest returns the candidate closest to got, or "" when none is close
// enough to be a likely typo or two are equally close. Case and '-' versus
// '_' do not count.
func suggest(got string, candidates []string) string {
	norm := func(s string) string { return strings.ReplaceAll(strings.ToLower(s), "-", "_") }
	g := norm(got)
	best, bestDist, tie := "", 3, false
	for _, c := range candidates {
		d := levenshtein(g, norm(c))
		switch {
		case d < bestDist && d < len(c):
			best, bestDist, tie = c, d, false
		case d == bestDist && c != best:
			tie = true
		}
	}
	if tie {
		return "" // "dc-c" is as close to dc-a as to dc-b: don't guess
	}
	return best
}

func levenshtein(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	if len(ra) > 64 || len(rb) > 64 {
		// Long keys are never typos of ours; avoid quadratic work.
		if a == b {
			return 0
		}
		return 1 << 20
	}
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(rb)]
}

// oneOf lists names for a fix text: "dc-a, dc-b or witness".
func oneOf(names []string) string {
	switch len(names) {
	case 0:
		return "(none defined)"
	case 1:
		return names[0]
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}
