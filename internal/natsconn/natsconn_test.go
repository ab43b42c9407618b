package natsconn

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
)

func TestExplain(t *testing.T) {
	for _, tc := range []struct {
		err       error
		permanent bool
		want      string
	}{
		{nats.ErrAuthorization, true, "sites.dc-a.nats_creds_file"},
		{fmt.Errorf("nats: Authorization Violation"), true, "refused the credentials"},
		{nats.ErrSecureConnRequired, true, "write tls://"},
		{nats.ErrSecureConnWanted, true, "use nats://"},
		{errors.New("tls: failed to verify certificate: x509: certificate signed by unknown authority"), true, "nats_ca_file"},
		{errors.New("x509: certificate is valid for nats.example.net, not 10.0.0.1"), true, "does not name the host"},
		{nats.ErrNoServers, false, ""},
	} {
		if got := Permanent(tc.err); got != tc.permanent {
			t.Errorf("Permanent(%v) = %v", tc.err, got)
		}
		got := Explain("dc-a", tc.err)
		if !errors.Is(got, tc.err) && !strings.Contains(got.Error(), tc.err.Error()) {
			t.Errorf("Explain(%v) lost the cause: %v", tc.err, got)
		}
		if !strings.Contains(got.Error(), "site dc-a") || !strings.Contains(got.Error(), tc.want) {
			t.Errorf("Explain(%v) = %v, want the site and %q", tc.err, got, tc.want)
		}
	}
	if Explain("dc-a", nil) != nil {
		t.Error("Explain(nil) is not nil")
	}
}
