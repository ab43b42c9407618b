package artefacts

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// deployDir is deploy/, seen from this package's directory.
const deployDir = ".."

// deployFiles returns the files under deploy/ whose names end in one of
// exts, relative to deploy/.
func deployFiles(t *testing.T, exts ...string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(deployDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		for _, ext := range exts {
			if !d.IsDir() && strings.HasSuffix(d.Name(), ext) {
				rel, err := filepath.Rel(deployDir, path)
				if err != nil {
					return err
				}
				out = append(out, rel)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func readDeploy(t *testing.T, rel string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(deployDir, rel))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// yamlDocs decodes every document of a YAML stream (Kubernetes manifests
// hold several, separated by ---). yaml.v3 refuses duplicate keys, tabs
// in indentation and the like.
func yamlDocs(data []byte) ([]*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var docs []*yaml.Node
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		docs = append(docs, &n)
	}
}

// TestYAMLFilesParse parses every YAML file under deploy/, every document
// of a multi-document file, and refuses empty ones.
func TestYAMLFilesParse(t *testing.T) {
	files := deployFiles(t, ".yaml", ".yml")
	if len(files) < 10 {
		t.Fatalf("found only %d YAML files under deploy/: %v", len(files), files)
	}
	for _, rel := range files {
		docs, err := yamlDocs(readDeploy(t, rel))
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		if len(docs) == 0 {
			t.Errorf("%s: no YAML document", rel)
		}
		for i, d := range docs {
			if len(d.Content) == 0 || d.Content[0].Kind != yaml.MappingNode {
				t.Errorf("%s: document %d is not a mapping", rel, i+1)
			}
		}
	}
}

// TestJSONFilesParse parses every JSON file under deploy/.
func TestJSONFilesParse(t *testing.T) {
	files := deployFiles(t, ".json")
	if len(files) == 0 {
		t.Fatal("found no JSON file under deploy/")
	}
	for _, rel := range files {
		var v any
		dec := json.NewDecoder(bytes.NewReader(readDeploy(t, rel)))
		if err := dec.Decode(&v); err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		if _, err := dec.Token(); !errors.Is(err, io.EOF) {
			t.Errorf("%s: trailing data after the JSON value", rel)
		}
	}
}

// TestNATSConfigsHaveATest makes sure the NATS configs stay loaded by
// nats-server's parser: deploy/local's TestExampleNATSConfigs does that
// (server.ProcessConfigFile on each), so it is not repeated here; this
// only fails if that test or a config goes missing.
func TestNATSConfigsHaveATest(t *testing.T) {
	confs := deployFiles(t, ".conf")
	var nats []string
	for _, c := range confs {
		if strings.HasPrefix(c, "nats"+string(filepath.Separator)) {
			nats = append(nats, c)
		}
	}
	if len(nats) != 3 {
		t.Errorf("deploy/nats: got %v, want the three site configs", nats)
	}
	src := string(readDeploy(t, filepath.Join("local", "examples_test.go")))
	if !strings.Contains(src, "func TestExampleNATSConfigs(") || !strings.Contains(src, "server.ProcessConfigFile(") {
		t.Error("deploy/local/examples_test.go no longer loads deploy/nats with server.ProcessConfigFile")
	}
}
