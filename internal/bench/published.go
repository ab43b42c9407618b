package bench

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// publishedBytes reads what the capture agent counted in
// xdcr_published_bytes_total since it started: the messages' bytes as
// encoded and as sent (compressed by capture.compression).
func (e *env) publishedBytes(ctx context.Context) (encoded, sent float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+e.c.HTTPAddr(e.primary)+"/metrics", nil)
	if err != nil {
		return 0, 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET /metrics of %s: %s", e.primary, resp.Status)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return 0, 0, fmt.Errorf("parse /metrics of %s: %w", e.primary, err)
	}
	f, ok := families["xdcr_published_bytes_total"]
	if !ok {
		return 0, 0, fmt.Errorf("%s has no xdcr_published_bytes_total", e.primary)
	}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			switch {
			case l.GetName() != "form":
			case l.GetValue() == "encoded":
				encoded = m.GetCounter().GetValue()
			case l.GetValue() == "sent":
				sent = m.GetCounter().GetValue()
			}
		}
	}
	return encoded, sent, nil
}
