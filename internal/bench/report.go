package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jedib0t/go-pretty/v6/table"
	"github.com/jedib0t/go-pretty/v6/text"
)

// median of values; NaN for none.
func median(values []float64) float64 {
	if len(values) == 0 {
		return math.NaN()
	}
	s := slices.Clone(values)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func minMax(values []float64) (float64, float64) {
	if len(values) == 0 {
		return math.NaN(), math.NaN()
	}
	return slices.Min(values), slices.Max(values)
}

// format renders a value for the table.
func format(v float64, unit string) string {
	switch {
	case math.IsNaN(v):
		return "–"
	case unit == "ms" || unit == "s":
		return strconv.FormatFloat(v, 'f', 2, 64)
	case v >= 100:
		return commas(int64(math.Round(v)))
	default:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
}

func commas(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func rangeOf(values []float64, unit string) string {
	lo, hi := minMax(values)
	if math.IsNaN(lo) {
		return "–"
	}
	return format(lo, unit) + " – " + format(hi, unit)
}

// machine renders a value for a BENCH line.
func machine(v float64) string {
	if math.IsNaN(v) {
		return "NA"
	}
	return strconv.FormatFloat(v, 'g', 6, 64)
}

// Render writes the table of medians and one machine-readable line per
// row: BENCH name=… native=… xdcr=… ratio=… unit=….
func (r *Report) Render(w io.Writer) {
	t := table.NewWriter()
	t.SetOutputMirror(w)
	t.SetTitle(fmt.Sprintf("xdcr vs native logical replication — scale %s, %d repetition(s), medians", r.Scale.Name, r.Reps))
	t.AppendHeader(table.Row{"Workload", "Unit", "Native", "xdcr", "xdcr/native", "Native range", "xdcr range", "Better"})
	for _, x := range r.Rows {
		better := "higher"
		if !x.Higher {
			better = "lower"
		}
		t.AppendRow(table.Row{x.Title, x.Unit, format(median(x.Native), x.Unit), format(median(x.XDCR), x.Unit),
			ratioText(median(x.Ratios)), rangeOf(x.Native, x.Unit), rangeOf(x.XDCR, x.Unit), better})
	}
	t.SetColumnConfigs([]table.ColumnConfig{
		{Number: 3, Align: text.AlignRight}, {Number: 4, Align: text.AlignRight}, {Number: 5, Align: text.AlignRight},
	})
	t.Render()
	fmt.Fprintf(w, "load average (1/5/15 min): %s at the start, %s at the end; per repetition (1 min): %s; %d CPUs; run took %s\n",
		r.LoadStart, r.LoadEnd, strings.Join(r.RepLoads, ", "), r.CPUs, r.Duration.Round(time.Second))
	if r.Versions != "" {
		fmt.Fprintf(w, "%s\n", r.Versions)
	}
	fmt.Fprintln(w, "xdcr/native is the median of the per-repetition ratios; native and xdcr drained the same backlog in each repetition, in alternating order.")
	for _, n := range r.Notes {
		fmt.Fprintln(w, n)
	}
	for _, x := range r.Rows {
		nlo, nhi := minMax(x.Native)
		xlo, xhi := minMax(x.XDCR)
		fmt.Fprintf(w, "BENCH name=%s native=%s xdcr=%s ratio=%s unit=%s better=%s reps=%d native_min=%s native_max=%s xdcr_min=%s xdcr_max=%s\n",
			x.Name, machine(median(x.Native)), machine(median(x.XDCR)), machine(median(x.Ratios)), x.Unit,
			map[bool]string{true: "higher", false: "lower"}[x.Higher], len(x.XDCR),
			machine(nlo), machine(nhi), machine(xlo), machine(xhi))
	}
	fmt.Fprintf(w, "BENCH_META scale=%s reps=%d cpus=%d load_start=%q load_end=%q duration_s=%.0f\n",
		r.Scale.Name, r.Reps, r.CPUs, r.LoadStart, r.LoadEnd, r.Duration.Seconds())
}

func ratioText(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(v, 'f', 2, 64) + "×"
}
