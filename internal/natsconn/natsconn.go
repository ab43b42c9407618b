// Package natsconn connects to a site's NATS server with the credentials
// and TLS files the config gives for it, and explains the failures that
// only an operator can fix.
package natsconn

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/xdcr/xdcr/internal/config"
)

// Options returns the nats.go options that carry a site's credentials and
// TLS files. The files are read when connecting.
func Options(a config.NATSAuth) ([]nats.Option, error) {
	var opts []nats.Option
	if a.CAFile != "" {
		opts = append(opts, nats.RootCAs(a.CAFile))
	}
	if a.CertFile != "" {
		opts = append(opts, nats.ClientCert(a.CertFile, a.KeyFile))
	}
	if a.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(a.CredsFile))
	}
	if a.NKeyFile != "" {
		opt, err := nats.NkeyOptionFromSeed(a.NKeyFile)
		if err != nil {
			return nil, fmt.Errorf("read the nkey seed file %s (nats_nkey_file): %w", a.NKeyFile, err)
		}
		opts = append(opts, opt)
	}
	return opts, nil
}

// Connect connects to the NATS of site once, with its credentials and TLS
// files, then extra. A failure says what to fix when it is one that
// retrying cannot cure (see [Permanent]).
func Connect(cfg *config.Config, site string, extra ...nats.Option) (*nats.Conn, error) {
	s, ok := cfg.Sites[site]
	if !ok {
		return nil, fmt.Errorf("site %q is not in the config", site)
	}
	opts, err := Options(s.NATSAuth)
	if err != nil {
		return nil, err
	}
	nc, err := nats.Connect(s.NATS, append(opts, extra...)...)
	if err != nil {
		return nil, Explain(site, err)
	}
	return nc, nil
}

// Permanent reports whether err is a refusal that retrying cannot cure:
// bad credentials, or a TLS failure.
func Permanent(err error) bool {
	if err == nil {
		return false
	}
	var (
		unknownCA *x509.UnknownAuthorityError
		invalid   x509.CertificateInvalidError
		host      x509.HostnameError
		verify    *tls.CertificateVerificationError
	)
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired), errors.Is(err, nats.ErrAuthRevoked),
		errors.Is(err, nats.ErrSecureConnRequired), errors.Is(err, nats.ErrSecureConnWanted),
		errors.As(err, &unknownCA), errors.As(err, &invalid), errors.As(err, &host), errors.As(err, &verify):
		return true
	}
	msg := strings.ToLower(err.Error())
	return strings.Contains(msg, "authorization violation") || strings.Contains(msg, "authentication") ||
		strings.Contains(msg, "tls: ") || strings.Contains(msg, "x509: ")
}

// Explain wraps a connection failure to site's NATS with the fix for it.
func Explain(site string, err error) error {
	if err == nil {
		return nil
	}
	msg := strings.ToLower(err.Error())
	var fix string
	switch {
	case errors.Is(err, nats.ErrAuthorization), strings.Contains(msg, "authorization violation"), strings.Contains(msg, "authentication"):
		fix = fmt.Sprintf("the server refused the credentials: check sites.%s.nats_creds_file or nats_nkey_file, or the user and password in sites.%s.nats, against the server's authorization settings", site, site)
	case errors.Is(err, nats.ErrSecureConnRequired):
		fix = fmt.Sprintf("the server requires TLS: write tls://HOST:PORT in sites.%s.nats and set nats_ca_file", site)
	case errors.Is(err, nats.ErrSecureConnWanted):
		fix = fmt.Sprintf("the server does not speak TLS: use nats:// in sites.%s.nats, or enable TLS on the server", site)
	case strings.Contains(msg, "x509: certificate signed by unknown authority"), strings.Contains(msg, "unknown authority"):
		fix = fmt.Sprintf("the server's certificate is not signed by sites.%s.nats_ca_file: point it at the CA that signed the server's certificate", site)
	case strings.Contains(msg, "x509: certificate is valid for"):
		fix = fmt.Sprintf("the server's certificate does not name the host in sites.%s.nats: use a host name the certificate is for", site)
	case strings.Contains(msg, "tls: ") || strings.Contains(msg, "x509: "):
		fix = fmt.Sprintf("the TLS handshake failed: check sites.%s.nats_ca_file, nats_cert_file and nats_key_file against the server's tls block", site)
	default:
		return fmt.Errorf("connect to the NATS of site %s: %w", site, err)
	}
	return fmt.Errorf("connect to the NATS of site %s: %w (%s)", site, err, fix)
}
