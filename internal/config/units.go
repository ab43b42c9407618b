package config

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"time"
)

// Byte size units. Binary units (KiB) are powers of 1024, decimal units (KB)
// powers of 1000, as in `ls`, NATS and Kubernetes.
var sizeUnits = []struct {
	name string
	mult int64
}{
	{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3},
	{"B", 1},
}

var errSize = errors.New("not a byte size")

// parseSize parses "512KiB", "1MiB", "1MB", "64 KiB" or a plain integer of
// bytes. Units are case-insensitive; the number is a whole number.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	num, mult := s, int64(1)
	for _, u := range sizeUnits {
		if len(s) > len(u.name) && strings.EqualFold(s[len(s)-len(u.name):], u.name) {
			num, mult = strings.TrimSpace(s[:len(s)-len(u.name)]), u.mult
			break
		}
	}
	if num == "" || strings.HasPrefix(num, "+") {
		return 0, errSize
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		return 0, errSize
	}
	if n > math.MaxInt64/mult || n < math.MinInt64/mult {
		return 0, errSize
	}
	return n * mult, nil
}

// formatSize writes n with the unit that divides it exactly and gives the
// smallest number (64MB rather than 62500KiB), so that
// parseSize(formatSize(n)) == n.
func formatSize(n int64) string {
	best := strconv.FormatInt(n, 10)
	if n <= 0 {
		return best
	}
	least := n
	for _, u := range sizeUnits[:len(sizeUnits)-1] {
		if n%u.mult == 0 && n/u.mult < least {
			least = n / u.mult
			best = strconv.FormatInt(least, 10) + u.name
		}
	}
	return best
}

// formatDuration writes d in Go syntax without zero tails: "168h", "2m",
// "5ms", "1h30m". time.ParseDuration reads it back exactly.
func formatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}
