package artefacts

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/xdcr/xdcr/internal/config"
)

const k8sDir = "k8s"

// The subset of the Kubernetes objects that the test looks at.
type k8sObject struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name      string            `yaml:"name"`
		Namespace string            `yaml:"namespace"`
		Labels    map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Data       map[string]string `yaml:"data"`
	StringData map[string]string `yaml:"stringData"`
	Spec       yaml.Node         `yaml:"spec"`
	file       string
}

type serviceSpec struct {
	ClusterIP                string            `yaml:"clusterIP"`
	PublishNotReadyAddresses bool              `yaml:"publishNotReadyAddresses"`
	Selector                 map[string]string `yaml:"selector"`
	Ports                    []servicePort     `yaml:"ports"`
}

type servicePort struct {
	Name       string `yaml:"name"`
	Port       int    `yaml:"port"`
	TargetPort string `yaml:"targetPort"`
}

type statefulSetSpec struct {
	ServiceName string `yaml:"serviceName"`
	Replicas    int    `yaml:"replicas"`
	Selector    struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"selector"`
	Template struct {
		Metadata struct {
			Labels map[string]string `yaml:"labels"`
		} `yaml:"metadata"`
		Spec podSpec `yaml:"spec"`
	} `yaml:"template"`
	VolumeClaimTemplates []volumeClaim `yaml:"volumeClaimTemplates"`
}

type volumeClaim struct {
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
}

type podSpec struct {
	AutomountServiceAccountToken *bool `yaml:"automountServiceAccountToken"`
	SecurityContext              struct {
		RunAsNonRoot   *bool `yaml:"runAsNonRoot"`
		RunAsUser      int   `yaml:"runAsUser"`
		SeccompProfile struct {
			Type string `yaml:"type"`
		} `yaml:"seccompProfile"`
	} `yaml:"securityContext"`
	Containers []container `yaml:"containers"`
	Volumes    []volume    `yaml:"volumes"`
}

type volume struct {
	Name      string `yaml:"name"`
	ConfigMap *struct {
		Name string `yaml:"name"`
	} `yaml:"configMap"`
	Secret *struct {
		SecretName string    `yaml:"secretName"`
		Items      []keyPath `yaml:"items"`
	} `yaml:"secret"`
	Projected *struct {
		Sources []map[string]any `yaml:"sources"`
	} `yaml:"projected"`
	EmptyDir map[string]any `yaml:"emptyDir"`
}

type keyPath struct {
	Key  string `yaml:"key"`
	Path string `yaml:"path"`
}

type container struct {
	Name    string   `yaml:"name"`
	Image   string   `yaml:"image"`
	Command []string `yaml:"command"`
	Args    []string `yaml:"args"`
	Env     []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom *struct {
			FieldRef *struct {
				FieldPath string `yaml:"fieldPath"`
			} `yaml:"fieldRef"`
			SecretKeyRef *struct {
				Name string `yaml:"name"`
				Key  string `yaml:"key"`
			} `yaml:"secretKeyRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	Ports           []containerPort `yaml:"ports"`
	LivenessProbe   *probe          `yaml:"livenessProbe"`
	ReadinessProbe  *probe          `yaml:"readinessProbe"`
	SecurityContext struct {
		RunAsNonRoot             *bool `yaml:"runAsNonRoot"`
		ReadOnlyRootFilesystem   *bool `yaml:"readOnlyRootFilesystem"`
		AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
		Capabilities             struct {
			Drop []string `yaml:"drop"`
		} `yaml:"capabilities"`
	} `yaml:"securityContext"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		SubPath   string `yaml:"subPath"`
	} `yaml:"volumeMounts"`
}

type containerPort struct {
	Name          string `yaml:"name"`
	ContainerPort int    `yaml:"containerPort"`
}

type probe struct {
	HTTPGet *struct {
		Path string `yaml:"path"`
		Port string `yaml:"port"`
	} `yaml:"httpGet"`
}

// k8sObjects reads every manifest under deploy/k8s except the
// kustomization files.
func k8sObjects(t *testing.T) []*k8sObject {
	t.Helper()
	var out []*k8sObject
	for _, rel := range deployFiles(t, ".yaml") {
		if !strings.HasPrefix(rel, k8sDir+string(filepath.Separator)) || filepath.Base(rel) == "kustomization.yaml" {
			continue
		}
		docs, err := yamlDocs(readDeploy(t, rel))
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		for _, d := range docs {
			o := &k8sObject{file: rel}
			if err := d.Decode(o); err != nil {
				t.Fatalf("%s: %v", rel, err)
			}
			if o.APIVersion == "" || o.Kind == "" || o.Metadata.Name == "" {
				t.Errorf("%s: an object without apiVersion, kind or metadata.name", rel)
			}
			out = append(out, o)
		}
	}
	return out
}

func find(objs []*k8sObject, kind, name string) *k8sObject {
	for _, o := range objs {
		if o.Kind == kind && o.Metadata.Name == name {
			return o
		}
	}
	return nil
}

// TestKubernetesManifests holds the Kubernetes manifests to the cluster
// file they carry and to what the agent needs: the ConfigMap's xdcr.yaml
// loads with internal/config using only the environment the pods set;
// every node of it has a StatefulSet of one pod whose name is the node id,
// in the node's site, with a headless Service that publishes the DNS name
// the node's raft: and http: addresses use, on the ports the container
// opens; probes hit /healthz and /readyz on the http port; the pod runs
// as non-root with a read-only root filesystem and no capabilities; the
// --config, --data-dir and every file the config names are mounted; and
// secrets come from the Secret, never from the command line.
func TestKubernetesManifests(t *testing.T) {
	objs := k8sObjects(t)
	cm := find(objs, "ConfigMap", "xdcr-config")
	if cm == nil {
		t.Fatal("no ConfigMap xdcr-config")
	}
	secret := find(objs, "Secret", "xdcr-secrets")
	if secret == nil {
		t.Fatal("no Secret xdcr-secrets")
	}
	var sets []*k8sObject
	for _, o := range objs {
		if o.Metadata.Namespace != "xdcr" && o.Kind != "Namespace" {
			t.Errorf("%s %s (%s): namespace %q, want xdcr", o.Kind, o.Metadata.Name, o.file, o.Metadata.Namespace)
		}
		if o.Kind == "StatefulSet" {
			sets = append(sets, o)
		}
	}
	if len(sets) != 3 {
		t.Fatalf("got %d StatefulSets, want one per site of the three", len(sets))
	}

	covered := map[string]bool{}
	var cfg *config.Config
	for _, o := range sets {
		t.Run(o.Metadata.Name, func(t *testing.T) {
			var sts statefulSetSpec
			if err := o.Spec.Decode(&sts); err != nil {
				t.Fatal(err)
			}
			pod := sts.Template.Spec
			if sts.Replicas != 1 {
				t.Errorf("replicas %d, want 1: one node per site", sts.Replicas)
			}
			for k, v := range sts.Selector.MatchLabels {
				if sts.Template.Metadata.Labels[k] != v {
					t.Errorf("selector %s=%s does not match the pod's labels", k, v)
				}
			}
			if len(pod.Containers) != 1 {
				t.Fatalf("got %d containers, want the agent only", len(pod.Containers))
			}
			c := pod.Containers[0]
			env := map[string]string{}
			for _, e := range c.Env {
				switch {
				case e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil:
					ref := e.ValueFrom.SecretKeyRef
					if ref.Name != secret.Metadata.Name {
						t.Errorf("env %s: from Secret %q, which the manifests lack", e.Name, ref.Name)
					} else if _, ok := secret.StringData[ref.Key]; !ok {
						t.Errorf("env %s: Secret %s has no key %q", e.Name, ref.Name, ref.Key)
					}
					env[e.Name] = "secret-value"
				case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil:
					env[e.Name] = "field:" + e.ValueFrom.FieldRef.FieldPath
				default:
					if regexp.MustCompile(`(?i)password|secret|token`).MatchString(e.Name) {
						t.Errorf("env %s: a secret in the manifest; take it from the Secret", e.Name)
					}
					env[e.Name] = e.Value
				}
			}

			// The command line.
			args := append(slices.Clone(c.Command), c.Args...)
			if !slices.Contains(args, "agent") {
				t.Errorf("args %q: want xdcr agent", args)
			}
			flag := func(name string) string {
				i := slices.Index(args, name)
				if i < 0 || i+1 >= len(args) {
					t.Errorf("args %q lack %s", args, name)
					return ""
				}
				return args[i+1]
			}
			for _, a := range args {
				if regexp.MustCompile(`(?i)password|secret|token|\$\{`).MatchString(a) {
					t.Errorf("argument %q may carry a secret: it shows in ps and in the pod spec", a)
				}
			}
			if v := flag("--node"); v != "$(XDCR_NODE)" || env["XDCR_NODE"] != "field:metadata.name" {
				t.Errorf("--node %q with XDCR_NODE %q: want $(XDCR_NODE) from the pod name", v, env["XDCR_NODE"])
			}

			// Mounts: path -> volume.
			mounts := map[string]string{}
			for _, m := range c.VolumeMounts {
				mounts[m.MountPath] = m.Name
			}
			mountOf := func(file string) (dir, volume string) {
				for d := path.Dir(file); d != "/" && d != "."; d = path.Dir(d) {
					if v, ok := mounts[d]; ok {
						return d, v
					}
				}
				return "", ""
			}
			volumeIndex := func(name string) int {
				return slices.IndexFunc(pod.Volumes, func(v volume) bool { return v.Name == name })
			}
			cfgPath := flag("--config")
			dir, vol := mountOf(cfgPath)
			if i := volumeIndex(vol); i < 0 || pod.Volumes[i].ConfigMap == nil || pod.Volumes[i].ConfigMap.Name != cm.Metadata.Name {
				t.Fatalf("--config %s is not in a mount of ConfigMap %s", cfgPath, cm.Metadata.Name)
			}
			rel := strings.TrimPrefix(cfgPath, dir+"/")
			text, ok := cm.Data[rel]
			if !ok {
				t.Fatalf("ConfigMap %s has no key %q for --config %s", cm.Metadata.Name, rel, cfgPath)
			}
			dataDir := flag("--data-dir")
			if v := mounts[dataDir]; v == "" || !slices.ContainsFunc(sts.VolumeClaimTemplates, func(p volumeClaim) bool { return p.Metadata.Name == v }) {
				t.Errorf("--data-dir %s is not the mount of a volumeClaimTemplate: the Raft state would not survive the pod", dataDir)
			}
			if _, ok := mounts["/tmp"]; !ok {
				t.Error("no writable /tmp on the read-only root filesystem")
			}

			// The config, with only the environment the pod sets.
			c2, err := config.Parse([]byte(text), func(name string) (string, bool) {
				v, ok := env[name]
				return v, ok
			})
			if err != nil {
				t.Fatalf("ConfigMap %s %s: %v", cm.Metadata.Name, rel, err)
			}
			cfg = c2

			// Every file the config names is mounted; the admin token
			// from the Secret.
			files := []string{cfg.HTTP.AdminTokenFile, cfg.TLS.CAFile, cfg.TLS.CertFile, cfg.TLS.KeyFile}
			for _, s := range cfg.Sites {
				a := s.NATSAuth
				files = append(files, a.CAFile, a.CertFile, a.KeyFile, a.CredsFile, a.NKeyFile)
				if u, err := url.Parse(s.Postgres); err == nil {
					for _, k := range []string{"sslrootcert", "sslcert", "sslkey", "passfile"} {
						files = append(files, u.Query().Get(k))
					}
				}
			}
			for _, f := range files {
				if f == "" {
					continue
				}
				f = strings.ReplaceAll(f, config.NodePlaceholder, o.Metadata.Name+"-0")
				dir, vol := mountOf(f)
				if dir == "" {
					t.Errorf("the config names %s, which no volume mounts", f)
					continue
				}
				if vol == "data" || vol == "tmp" {
					t.Errorf("the config names %s, in the %s volume", f, vol)
				}
				if i := volumeIndex(vol); i >= 0 && pod.Volumes[i].Secret != nil {
					v := pod.Volumes[i].Secret
					rel := strings.TrimPrefix(f, dir+"/")
					if !slices.ContainsFunc(v.Items, func(it keyPath) bool {
						_, inSecret := secret.StringData[it.Key]
						return it.Path == rel && inSecret && v.SecretName == secret.Metadata.Name
					}) {
						t.Errorf("%s: Secret volume %s does not project it from a key of %s", f, vol, secret.Metadata.Name)
					}
				}
			}
			if cfg.HTTP.AdminTokenFile == "" && cfg.HTTP.AdminToken == "" {
				t.Error("the config sets no admin token: anyone who reaches a node could promote a site")
			}

			// The node: the pod's name, its site, its DNS name, its ports.
			node := o.Metadata.Name + "-0"
			covered[node] = true
			n, ok := cfg.Node(node)
			if !ok {
				t.Fatalf("the pod %s is no node of the config (nodes %v)", node, cfg.NodeNames())
			}
			if site := o.Metadata.Labels["xdcr.io/site"]; n.Site != site || sts.Template.Metadata.Labels["xdcr.io/site"] != site {
				t.Errorf("node %s is in site %s, the StatefulSet and its pods are labelled %q and %q", node, n.Site, site, sts.Template.Metadata.Labels["xdcr.io/site"])
			}
			svc := find(objs, "Service", sts.ServiceName)
			if svc == nil {
				t.Fatalf("serviceName %s: no such Service", sts.ServiceName)
			}
			var ss serviceSpec
			if err := svc.Spec.Decode(&ss); err != nil {
				t.Fatal(err)
			}
			if ss.ClusterIP != "None" || !ss.PublishNotReadyAddresses {
				t.Errorf("Service %s: clusterIP %q publishNotReadyAddresses %v: want a headless Service that publishes pods before they are ready (readiness needs a Raft leader, which needs the names)",
					svc.Metadata.Name, ss.ClusterIP, ss.PublishNotReadyAddresses)
			}
			for k, v := range ss.Selector {
				if sts.Template.Metadata.Labels[k] != v {
					t.Errorf("Service %s selects %s=%s, which the pods lack", svc.Metadata.Name, k, v)
				}
			}
			fqdn := fmt.Sprintf("%s.%s.%s.svc.cluster.local", node, svc.Metadata.Name, o.Metadata.Namespace)
			for _, p := range []struct{ name, addr string }{{"raft", n.Raft}, {"http", n.HTTP}} {
				host, port, err := net.SplitHostPort(p.addr)
				if err != nil {
					t.Fatal(err)
				}
				if host != fqdn {
					t.Errorf("node %s %s: host %s, want the pod's DNS name %s", node, p.name, host, fqdn)
				}
				num, _ := strconv.Atoi(port)
				if !slices.ContainsFunc(c.Ports, func(cp containerPort) bool {
					return cp.Name == p.name && cp.ContainerPort == num
				}) {
					t.Errorf("node %s %s: the container has no port %s: %d", node, p.name, p.name, num)
				}
				if !slices.ContainsFunc(ss.Ports, func(sp servicePort) bool {
					return sp.Port == num && (sp.TargetPort == p.name || sp.TargetPort == port)
				}) {
					t.Errorf("Service %s has no port %d to %s", svc.Metadata.Name, num, p.name)
				}
			}
			_, httpPort, _ := net.SplitHostPort(n.HTTP)
			for _, pr := range []struct {
				name, path string
				p          *probe
			}{{"livenessProbe", "/healthz", c.LivenessProbe}, {"readinessProbe", "/readyz", c.ReadinessProbe}} {
				if pr.p == nil || pr.p.HTTPGet == nil || pr.p.HTTPGet.Path != pr.path || (pr.p.HTTPGet.Port != "http" && pr.p.HTTPGet.Port != httpPort) {
					t.Errorf("%s: want httpGet %s on the http port", pr.name, pr.path)
				}
			}

			// Least privilege.
			sc := c.SecurityContext
			if pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot || pod.SecurityContext.RunAsUser == 0 {
				t.Error("the pod does not run as non-root")
			}
			if pod.SecurityContext.SeccompProfile.Type != "RuntimeDefault" {
				t.Error("the pod has no RuntimeDefault seccomp profile")
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Error("the root filesystem is writable")
			}
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Error("allowPrivilegeEscalation is not false")
			}
			if !slices.Contains(sc.Capabilities.Drop, "ALL") {
				t.Error("capabilities are not dropped")
			}
			if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
				t.Error("the pod mounts a service account token it does not need")
			}
		})
	}
	if cfg != nil {
		for _, id := range cfg.NodeNames() {
			if !covered[id] {
				t.Errorf("node %s of the config has no StatefulSet", id)
			}
		}
	}
}

// TestKustomizations checks that every resource a kustomization.yaml
// lists exists, and builds each with `kubectl kustomize` when kubectl is
// installed.
func TestKustomizations(t *testing.T) {
	var dirs []string
	for _, rel := range deployFiles(t, "kustomization.yaml") {
		dir := filepath.Join(deployDir, filepath.Dir(rel))
		dirs = append(dirs, dir)
		var k struct {
			Resources []string `yaml:"resources"`
		}
		if err := yaml.Unmarshal(readDeploy(t, rel), &k); err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		if len(k.Resources) == 0 {
			t.Errorf("%s lists no resources", rel)
		}
		for _, r := range k.Resources {
			fi, err := os.Stat(filepath.Join(dir, r))
			if err != nil {
				t.Errorf("%s: resource %s: %v", rel, r, err)
				continue
			}
			if fi.IsDir() {
				if _, err := os.Stat(filepath.Join(dir, r, "kustomization.yaml")); err != nil {
					t.Errorf("%s: resource %s is a directory without kustomization.yaml", rel, r)
				}
			}
		}
	}
	if len(dirs) < 5 {
		t.Errorf("got kustomizations %v, want deploy/k8s, common and one per site", dirs)
	}
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Skip("kubectl is not installed")
	}
	for _, dir := range dirs {
		out, err := exec.Command(kubectl, "kustomize", dir).CombinedOutput()
		if err != nil {
			t.Errorf("kubectl kustomize %s: %v\n%s", dir, err, out)
		}
	}
}
