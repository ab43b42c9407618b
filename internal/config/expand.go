package config

import (
	"fmt"
	"strings"
)

// expansion is the result of expanding ${VAR} references in one string.
type expansion struct {
	value    string      // the expanded string
	used     []string    // values substituted from the environment
	problems [][2]string // problem, fix
}

// substituted reports whether any part of the value came from the
// environment.
func (x expansion) substituted() bool { return len(x.used) > 0 }

// expand replaces every ${NAME} in s with the value lookupEnv gives for
// NAME. "$$" stands for a literal "$"; a "$" followed by anything else is
// kept as it is. NAME is a letter or '_' followed by letters, digits and
// '_'. An unset variable or a malformed reference is a problem; the
// messages name the variable but never a value from the environment.
func expand(s string, lookupEnv func(string) (string, bool)) expansion {
	if !strings.Contains(s, "$") {
		return expansion{value: s}
	}
	var (
		x expansion
		b strings.Builder
	)
	for i := 0; i < len(s); {
		c := s[i]
		if c != '$' || i+1 >= len(s) {
			b.WriteByte(c)
			i++
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i += 2
			continue
		case '{':
		default:
			b.WriteByte(c)
			i++
			continue
		}
		end := strings.IndexByte(s[i+2:], '}')
		if end < 0 {
			x.problems = append(x.problems, [2]string{
				"has a ${ without a closing }",
				"close the reference as ${NAME}, or write $$ for a literal $",
			})
			b.WriteString(s[i:])
			break
		}
		name := s[i+2 : i+2+end]
		i += 2 + end + 1
		if !isVarName(name) {
			x.problems = append(x.problems, [2]string{
				fmt.Sprintf("${%s} is not a valid environment variable reference", clip(name)),
				"write ${NAME} where NAME has only letters, digits and _ (defaults like ${NAME:-x} are not supported), or write $$ for a literal $",
			})
			continue
		}
		v, ok := lookupEnv(name)
		if !ok {
			x.problems = append(x.problems, [2]string{
				fmt.Sprintf("environment variable %s is not set", name),
				fmt.Sprintf("export it or remove ${%s}", name),
			})
			continue
		}
		b.WriteString(v)
		if v != "" {
			x.used = append(x.used, v)
		}
	}
	x.value = b.String()
	return x
}

func isVarName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '_', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case c >= '0' && c <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}

// escapeDollars is the inverse of expand for a string without references:
// expand(escapeDollars(s)) == s.
func escapeDollars(s string) string {
	return strings.ReplaceAll(s, "$", "$$")
}

// clip shortens text from the file for an error message.
func clip(s string) string {
	const max = 40
	if len(s) <= max {
		return s
	}
	r := []rune(s)
	if len(r) <= max {
		return s
	}
	return string(r[:max]) + "…"
}
