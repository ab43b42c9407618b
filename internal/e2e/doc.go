// Package e2e holds the end-to-end tests of the data path: real PostgreSQL
// clusters and NATS servers on loopback (deploy/local), and agents running
// as separate processes of the xdcr binary (deploy/topology), so that kill
// -9 is real. There is no non-test code here.
package e2e
