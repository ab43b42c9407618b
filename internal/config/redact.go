package config

import (
	"net/url"
	"regexp"
	"sort"
	"strings"
)

// redactMask replaces a password in output, as pgconn does.
const redactMask = "xxxxx"

// RedactDSN returns dsn with its passwords replaced by "xxxxx", so that it
// can be logged or shown in an error. It handles
//
//   - URLs (postgres://, nats://, redis://, …, also comma-separated lists):
//     the password in the userinfo, and password= / sslpassword= query
//     parameters. For schemes other than postgres/postgresql the whole
//     userinfo is masked, because NATS and Redis take a bare token there.
//   - PostgreSQL key=value strings: password= and sslpassword=, quoted or
//     not.
//
// It errs on the side of masking too much: when the input is malformed it
// may hide more than the password, never less for the forms above.
func RedactDSN(dsn string) string {
	s, _ := redact(dsn)
	return s
}

var (
	kvPassword = regexp.MustCompile(`(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)`)
	urlPrefix  = regexp.MustCompile(`^\s*[A-Za-z][A-Za-z0-9+.-]*://`)
)

// redact returns s with passwords masked, and the passwords it masked.
func redact(s string) (string, []string) {
	if !urlPrefix.MatchString(s) {
		var secrets []string
		out := kvPassword.ReplaceAllStringFunc(s, func(m string) string {
			sub := kvPassword.FindStringSubmatch(m)
			if sub[2] != "" {
				secrets = append(secrets, strings.Trim(sub[2], "'"))
			}
			return sub[1] + redactMask
		})
		return out, secrets
	}

	var (
		b       strings.Builder
		secrets []string
	)
	rest := s
	for {
		i := strings.Index(rest, "://")
		if i < 0 {
			b.WriteString(rest)
			break
		}
		scheme := strings.ToLower(rest[:i])
		if k := strings.LastIndexAny(scheme, ", \t"); k >= 0 {
			scheme = scheme[k+1:]
		}
		b.WriteString(rest[:i+3])
		rest = rest[i+3:]
		// This URL runs to the next "://" (a list) or the end.
		end := len(rest)
		if j := strings.Index(rest, "://"); j >= 0 {
			end = j
		}
		seg := rest[:end]
		rest = rest[end:]

		// Userinfo ends at the last '@': a password may hold '/', '?' or
		// '#' that a strict parser would take for the end of the host.
		if at := strings.LastIndexByte(seg, '@'); at >= 0 {
			userinfo := seg[:at]
			user, pass, hasPass := strings.Cut(userinfo, ":")
			switch {
			case scheme != "postgres" && scheme != "postgresql":
				// NATS and Redis take a bare token as userinfo, and user
				// names are no secret worth keeping: mask it all.
				b.WriteString(redactMask)
				if userinfo != "" {
					secrets = append(secrets, userinfo, unescape(userinfo))
				}
				if pass != "" {
					secrets = append(secrets, pass, unescape(pass))
				}
			case hasPass:
				b.WriteString(user)
				b.WriteString(":" + redactMask)
				if pass != "" {
					secrets = append(secrets, pass, unescape(pass))
				}
			default:
				b.WriteString(user)
			}
			b.WriteByte('@')
			seg = seg[at+1:]
		}
		// Query parameters named password or sslpassword.
		if q := strings.IndexByte(seg, '?'); q >= 0 {
			b.WriteString(seg[:q+1])
			params := strings.Split(seg[q+1:], "&")
			for k, p := range params {
				key, val, hasVal := strings.Cut(p, "=")
				name := strings.ToLower(unescape(key))
				if hasVal && (name == "password" || name == "sslpassword") {
					if val != "" {
						secrets = append(secrets, val, unescape(val))
					}
					params[k] = key + "=" + redactMask
				}
			}
			b.WriteString(strings.Join(params, "&"))
		} else {
			b.WriteString(seg)
		}
	}
	return b.String(), secrets
}

func unescape(s string) string {
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}

// scrubber removes secret values from error text.
type scrubber []string

// minScrubLen is the shortest value scrubbed from all messages. Shorter
// values are too common a substring ("0", "on") to remove everywhere without
// garbling the text, and carry no useful secret; the messages themselves
// never quote a value from the environment (see validator.show).
const minScrubLen = 4

// newScrubber returns a scrubber for the given values, longest first so that
// a value containing another is masked whole.
func newScrubber(values []string, minLen int) scrubber {
	var s scrubber
	seen := map[string]bool{}
	for _, v := range values {
		if len(v) >= minLen && !seen[v] {
			seen[v] = true
			s = append(s, v)
		}
	}
	sort.Slice(s, func(i, j int) bool { return len(s[i]) > len(s[j]) })
	return s
}

func (s scrubber) scrub(text string) string {
	for _, v := range s {
		if strings.Contains(text, v) {
			text = strings.ReplaceAll(text, v, redactMask)
		}
	}
	return text
}
