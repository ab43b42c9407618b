package artefacts

import (
	"fmt"
	"strings"
)

// Selector is one vector selector of a PromQL expression: the metric it
// names and its label matchers.
type Selector struct {
	Name     string
	Matchers []Matcher
}

// Matcher is one label matcher of a selector, e.g. site=~"dc-.*".
type Matcher struct {
	Label, Op, Value string
}

// Selectors returns the vector selectors of a PromQL expression, in order.
//
// It is a tokenizer, not a full parser: it skips strings, numbers,
// durations, range and subquery brackets, Grafana variables ($job,
// ${site}, $__rate_interval) and the label lists of by, without, on,
// ignoring, group_left and group_right; it knows PromQL's functions,
// aggregation operators and keywords; and it takes every other identifier
// for a metric name. It errs on the side of failing: an identifier called
// like a function that PromQL does not have, an unbalanced bracket, a
// malformed matcher or a character PromQL does not use is an error, and a
// keyword it does not know comes back as a metric name that no agent
// exports.
func Selectors(expr string) ([]Selector, error) {
	toks, err := lex(expr)
	if err != nil {
		return nil, err
	}
	match, err := pairBrackets(toks)
	if err != nil {
		return nil, err
	}
	var sels []Selector
	for i := 0; i < len(toks); i++ {
		t := toks[i]
		next := token{}
		if i+1 < len(toks) {
			next = toks[i+1]
		}
		switch t.kind {
		case tokPunct:
			switch t.text {
			case "[": // a range or subquery: durations and Grafana variables only
				i = match[i]
			case "{": // a selector without a leading name: {__name__="x"} or {"x"}
				sel, err := matchers(toks[i+1 : match[i]])
				if err != nil {
					return nil, fmt.Errorf("selector at %d: %w", t.pos, err)
				}
				for _, m := range sel.Matchers {
					if m.Label == "__name__" && m.Op == "=" {
						sel.Name = m.Value
					}
				}
				if sel.Name == "" {
					return nil, fmt.Errorf("selector at %d names no metric", t.pos)
				}
				sels = append(sels, sel)
				i = match[i]
			}
		case tokIdent:
			lower := strings.ToLower(t.text)
			switch {
			case groupingKeywords[lower]:
				if next.is("(") {
					i = match[i+1] // a list of label names
				}
			case keywords[lower], lower == "inf", lower == "nan":
			case next.is("("):
				if !functions[t.text] && !aggregations[lower] {
					return nil, fmt.Errorf("%s at %d is not a PromQL function", t.text, t.pos)
				}
			case aggregations[lower] && next.kind == tokIdent && (strings.EqualFold(next.text, "by") || strings.EqualFold(next.text, "without")):
			default:
				sel := Selector{Name: t.text}
				if next.is("{") {
					m, err := matchers(toks[i+2 : match[i+1]])
					if err != nil {
						return nil, fmt.Errorf("selector %s at %d: %w", t.text, t.pos, err)
					}
					if m.Name != "" {
						return nil, fmt.Errorf("selector %s at %d names its metric twice", t.text, t.pos)
					}
					sel.Matchers = m.Matchers
					i = match[i+1]
				}
				sels = append(sels, sel)
			}
		}
	}
	return sels, nil
}

// matchers parses the tokens between { and }: label op "value" pairs
// separated by commas, and, as Prometheus 3 allows, a lone quoted metric
// name, which comes back as Name.
func matchers(toks []token) (Selector, error) {
	var sel Selector
	for i := 0; i < len(toks); {
		t := toks[i]
		switch {
		case t.kind == tokString && (i+1 == len(toks) || toks[i+1].is(",")):
			sel.Name = t.text
			i++
		case t.kind == tokIdent || t.kind == tokString:
			if i+2 >= len(toks) {
				return sel, fmt.Errorf("matcher %s at %d is incomplete", t.text, t.pos)
			}
			op, val := toks[i+1], toks[i+2]
			if op.kind != tokPunct || !matchOps[op.text] {
				return sel, fmt.Errorf("matcher %s at %d: %q is not =, !=, =~ or !~", t.text, t.pos, op.text)
			}
			if val.kind != tokString {
				return sel, fmt.Errorf("matcher %s at %d: the value must be a quoted string", t.text, t.pos)
			}
			sel.Matchers = append(sel.Matchers, Matcher{Label: t.text, Op: op.text, Value: val.text})
			i += 3
		default:
			return sel, fmt.Errorf("unexpected %q at %d in a selector", t.text, t.pos)
		}
		if i < len(toks) {
			if !toks[i].is(",") {
				return sel, fmt.Errorf("unexpected %q at %d in a selector: want ,", toks[i].text, toks[i].pos)
			}
			i++
		}
	}
	return sel, nil
}

// pairBrackets returns, for every opening bracket's index, the index of
// its closing one, and the other way round.
func pairBrackets(toks []token) (map[int]int, error) {
	closing := map[string]string{"(": ")", "[": "]", "{": "}"}
	match := map[int]int{}
	var stack []int
	for i, t := range toks {
		if t.kind != tokPunct {
			continue
		}
		switch t.text {
		case "(", "[", "{":
			stack = append(stack, i)
		case ")", "]", "}":
			if len(stack) == 0 {
				return nil, fmt.Errorf("unbalanced %s at %d", t.text, t.pos)
			}
			open := stack[len(stack)-1]
			if closing[toks[open].text] != t.text {
				return nil, fmt.Errorf("%s at %d closes %s at %d", t.text, t.pos, toks[open].text, toks[open].pos)
			}
			stack = stack[:len(stack)-1]
			match[open], match[i] = i, open
		}
	}
	if len(stack) > 0 {
		t := toks[stack[len(stack)-1]]
		return nil, fmt.Errorf("unclosed %s at %d", t.text, t.pos)
	}
	return match, nil
}

type tokenKind int

const (
	tokNone tokenKind = iota
	tokIdent
	tokString // text without the quotes
	tokNumber // numbers and durations
	tokVar    // a Grafana variable
	tokPunct
)

type token struct {
	kind tokenKind
	text string
	pos  int
}

func (t token) is(punct string) bool { return t.kind == tokPunct && t.text == punct }

func lex(s string) ([]token, error) {
	var out []token
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#': // a comment, to the end of the line
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			j := i + 1
			for j < len(s) && s[j] != c {
				if s[j] == '\\' && c != '`' {
					j++
				}
				j++
			}
			if j >= len(s) {
				return nil, fmt.Errorf("unterminated string at %d", i)
			}
			out = append(out, token{tokString, s[i+1 : j], i})
			i = j + 1
		case c == '$':
			j := i + 1
			if j < len(s) && s[j] == '{' {
				k := strings.IndexByte(s[j:], '}')
				if k < 0 {
					return nil, fmt.Errorf("unterminated ${ at %d", i)
				}
				j += k + 1
			} else {
				for j < len(s) && isWordChar(s[j]) {
					j++
				}
			}
			if j == i+1 {
				return nil, fmt.Errorf("lone $ at %d", i)
			}
			out = append(out, token{tokVar, s[i:j], i})
			i = j
		case isDigit(c) || c == '.' && i+1 < len(s) && isDigit(s[i+1]):
			j := i
			for j < len(s) && (isWordChar(s[j]) || s[j] == '.' || s[j] == ':' ||
				(s[j] == '+' || s[j] == '-') && (s[j-1] == 'e' || s[j-1] == 'E') && !strings.HasPrefix(s[i:], "0x")) {
				j++
			}
			out = append(out, token{tokNumber, s[i:j], i})
			i = j
		case isIdentStart(c):
			j := i + 1
			for j < len(s) && (isWordChar(s[j]) || s[j] == ':') {
				j++
			}
			out = append(out, token{tokIdent, s[i:j], i})
			i = j
		default:
			if i+1 < len(s) && twoCharOps[s[i:i+2]] {
				out = append(out, token{tokPunct, s[i : i+2], i})
				i += 2
				continue
			}
			if !strings.ContainsRune("(){}[],+-*/%^<>=@", rune(c)) {
				return nil, fmt.Errorf("unexpected character %q at %d", c, i)
			}
			out = append(out, token{tokPunct, s[i : i+1], i})
			i++
		}
	}
	return out, nil
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z'
}
func isWordChar(c byte) bool {
	return c == '_' || isDigit(c) || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z'
}

var twoCharOps = set("==", "!=", "<=", ">=", "=~", "!~")

var matchOps = set("=", "!=", "=~", "!~")

// groupingKeywords are followed by a list of label names.
var groupingKeywords = set("by", "without", "on", "ignoring", "group_left", "group_right")

var keywords = set("and", "or", "unless", "atan2", "bool", "offset")

// aggregations are PromQL's aggregation operators (case-insensitive).
var aggregations = set("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
	"bottomk", "topk", "quantile", "limitk", "limit_ratio")

// functions are PromQL's functions (Prometheus 3), with start() and end()
// of the @ modifier.
var functions = set("abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
	"avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time",
	"day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv",
	"double_exponential_smoothing", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
	"histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour",
	"idelta", "increase", "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10",
	"log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
	"present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin",
	"sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time",
	"stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
	"start", "end")

func set(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}
