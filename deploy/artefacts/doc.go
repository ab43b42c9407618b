// Package artefacts reads the deployment artefacts that deploy/ ships for
// real datacenters — the Prometheus alert rules, the Grafana dashboard —
// and pulls the metric names and label matchers out of their PromQL, so
// tests can hold them to the metrics the agent really exports
// (internal/agent's TestArtefactsNameExportedMetrics). Its own tests check
// that every YAML and JSON file under deploy/ parses, that the systemd unit
// keeps its hardening, that the Kubernetes manifests agree with the config
// they carry, and that deploy/postgres/roles.sql grants what the agent
// needs. deploy/README.md describes the artefacts.
package artefacts
