package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// pgBinaries are the PostgreSQL server programs one cluster runs with.
type pgBinaries struct {
	postgres string
	initdb   string
	major    string // "15"
}

// errNoPostgres explains what to install when no server binaries are found.
var errNoPostgres = errors.New("postgresql server binaries not found: neither postgres and initdb on PATH nor a working pg_config --bindir; " +
	"install the PostgreSQL server package (Debian: apt-get install postgresql-15) or put its bin directory (pg_config --bindir) on PATH")

var pgVersionRE = regexp.MustCompile(`\(PostgreSQL\) (\d+)(?:\.(\d+))?`)

// findPGBinaries looks up postgres and initdb on PATH first, then in
// `pg_config --bindir`, and asks postgres for its major version.
func findPGBinaries(ctx context.Context) (pgBinaries, error) {
	var b pgBinaries
	pg, err1 := exec.LookPath("postgres")
	ini, err2 := exec.LookPath("initdb")
	if err1 == nil && err2 == nil {
		b.postgres, b.initdb = pg, ini
	} else {
		out, err := exec.CommandContext(ctx, "pg_config", "--bindir").Output()
		if err != nil {
			return b, fmt.Errorf("%w (pg_config: %w)", errNoPostgres, err)
		}
		dir := strings.TrimSpace(string(out))
		b.postgres, b.initdb = filepath.Join(dir, "postgres"), filepath.Join(dir, "initdb")
		for _, p := range []string{b.postgres, b.initdb} {
			if _, err := os.Stat(p); err != nil {
				return b, fmt.Errorf("%w (pg_config --bindir says %s: %w)", errNoPostgres, dir, err)
			}
		}
	}
	// initdb finds postgres next to its own resolved path; resolve symlinks
	// (e.g. /usr/local/bin/postgres -> /usr/lib/postgresql/15/bin/postgres)
	// so the error messages name the real programs.
	for _, p := range []*string{&b.postgres, &b.initdb} {
		if r, err := filepath.EvalSymlinks(*p); err == nil {
			*p = r
		}
	}
	// "postgres -V" is answered before the refuse-to-run-as-root check.
	out, err := exec.CommandContext(ctx, b.postgres, "-V").Output()
	if err != nil {
		return b, fmt.Errorf("run %s -V: %w", b.postgres, err)
	}
	m := pgVersionRE.FindStringSubmatch(string(out))
	if m == nil {
		return b, fmt.Errorf("parse postgres version from %q", strings.TrimSpace(string(out)))
	}
	b.major = m[1]
	if n, _ := strconv.Atoi(m[1]); n < 10 && m[2] != "" { // 9.6 and older: major is "9.6"
		b.major = m[1] + "." + m[2]
	}
	return b, nil
}

// runAs is the OS user PostgreSQL runs as: the caller itself, or the
// "postgres" user when the caller is root.
type runAs struct {
	uid, gid uint32
	groups   []uint32
	name     string
	switched bool // true when the caller is root and the server runs as another user
}

func currentRunAs() (runAs, error) {
	if os.Geteuid() != 0 {
		return runAs{uid: uint32(os.Geteuid()), gid: uint32(os.Getegid()), name: "current user"}, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return runAs{}, fmt.Errorf("look up the postgres OS user (PostgreSQL refuses to run as root; create the user or run as non-root): %w", err)
	}
	ra := runAs{name: "postgres", switched: true}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return runAs{}, fmt.Errorf("parse uid of postgres: %w", err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return runAs{}, fmt.Errorf("parse gid of postgres: %w", err)
	}
	ra.uid, ra.gid = uint32(uid), uint32(gid)
	gids, err := u.GroupIds()
	if err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				ra.groups = append(ra.groups, uint32(n))
			}
		}
	}
	return ra, nil
}

// credential is what exec.Cmd needs to run as ra; nil when no switch is needed.
func (ra runAs) credential() *syscall.Credential {
	if !ra.switched {
		return nil
	}
	return &syscall.Credential{Uid: ra.uid, Gid: ra.gid, Groups: ra.groups}
}

// chown gives path to ra when the caller is root; a no-op otherwise.
func (ra runAs) chown(path string) error {
	if !ra.switched {
		return nil
	}
	if err := os.Lchown(path, int(ra.uid), int(ra.gid)); err != nil {
		return fmt.Errorf("chown %s to %s: %w", path, ra.name, err)
	}
	return nil
}

// canTraverse reports whether ra may search (execute) a directory with info fi.
func (ra runAs) canTraverse(fi fs.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return true
	}
	mode := fi.Mode().Perm()
	switch {
	case st.Uid == ra.uid:
		return mode&0o100 != 0
	case st.Gid == ra.gid || containsUint32(ra.groups, st.Gid):
		return mode&0o010 != 0
	default:
		return mode&0o001 != 0
	}
}

func containsUint32(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// openAncestors makes sure ra can reach dir (an absolute, cleaned path): every
// ancestor must be searchable by ra. Ancestors below tmpRoot (os.TempDir()
// in production; t.TempDir() and mktemp -d make 0700 directories there) get
// o+x added; any other ancestor that ra cannot search is an error that names
// the directory and the fix. dir itself need not exist.
func openAncestors(dir, tmpRoot string, ra runAs) error {
	if !ra.switched {
		return nil
	}
	tmpRoot = filepath.Clean(tmpRoot)
	var ancestors []string
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		ancestors = append(ancestors, p)
		if p == filepath.Dir(p) {
			break
		}
	}
	// Walk from the root down, so the error names the topmost blocker.
	for i := len(ancestors) - 1; i >= 0; i-- {
		p := ancestors[i]
		fi, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // the rest is created by us (0755 or 0700 owned by ra)
		}
		if err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		if ra.canTraverse(fi) {
			continue
		}
		if strings.HasPrefix(p, tmpRoot+string(filepath.Separator)) {
			if err := os.Chmod(p, fi.Mode().Perm()|0o001); err != nil {
				return fmt.Errorf("let the %s user traverse %s (chmod o+x): %w", ra.name, p, err)
			}
			continue
		}
		return fmt.Errorf("postgresql runs as the %q OS user, which cannot enter %s (an ancestor of %s): "+
			"choose a data directory under %s, or run chmod o+x %s", ra.name, p, dir, tmpRoot, p)
	}
	return nil
}

// templateDir is where the initdb template for this version and user lives.
func templateDir(b pgBinaries, ra runAs) string {
	return filepath.Join(os.TempDir(), fmt.Sprintf("xdcr-pgtemplate-%s-%d", b.major, ra.uid))
}

// ensureTemplate returns the path of a freshly initdb'ed cluster that new
// clusters are copied from, creating it on first use. Creation is serialised
// across processes with flock on a lock file next to it and published with
// an atomic rename, so concurrent test binaries never see half a template.
func ensureTemplate(ctx context.Context, b pgBinaries, ra runAs, logger *slog.Logger) (string, error) {
	final := templateDir(b, ra)
	if fileExists(filepath.Join(final, "PG_VERSION")) {
		return final, nil
	}
	lock, err := openLockFile(final+".lock", ra)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := flockContext(ctx, lock); err != nil {
		return "", fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck // closing the file unlocks too

	if fileExists(filepath.Join(final, "PG_VERSION")) {
		return final, nil // another process made it while we waited
	}
	// We hold the lock: leftovers are from a process that died mid-initdb.
	if old, _ := filepath.Glob(final + ".tmp*"); len(old) > 0 {
		for _, o := range old {
			_ = os.RemoveAll(o)
		}
	}
	_ = os.RemoveAll(final) // exists only without PG_VERSION: broken

	tmp, err := os.MkdirTemp(filepath.Dir(final), filepath.Base(final)+".tmp")
	if err != nil {
		return "", fmt.Errorf("create template dir: %w", err)
	}
	defer os.RemoveAll(tmp) // after a successful rename there is nothing left to remove
	if err := ra.chown(tmp); err != nil {
		return "", err
	}
	start := time.Now()
	cmd := exec.CommandContext(ctx, b.initdb, "-D", tmp, "-U", "postgres", "--auth=trust",
		"-E", "UTF8", "--locale=C", "--no-sync")
	cmd.Dir = filepath.Dir(final)
	cmd.Env = pgEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: ra.credential()}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("initdb %s: %w\n%s", tmp, err, tail(out.Bytes(), 2048))
	}
	if err := os.Rename(tmp, final); err != nil {
		return "", fmt.Errorf("publish template %s: %w", final, err)
	}
	logger.Info("created postgresql template", "dir", final, "took", time.Since(start).Round(time.Millisecond))
	return final, nil
}

// openLockFile opens (creating if needed) the lock file at path. It tries a
// plain open first: with fs.protected_regular, O_CREATE on a file another
// user owns in the sticky /tmp fails even when the file exists.
func openLockFile(path string, ra runAs) (*os.File, error) {
	f, err := os.Open(path)
	if err == nil {
		return f, nil
	}
	f, err = os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open template lock: %w", err)
	}
	_ = ra.chown(path) // so the postgres user itself can use the cache too
	return f, nil
}

// flockContext takes an exclusive flock on f, polling so ctx can end the wait.
func flockContext(ctx context.Context, f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// copyCluster copies the template into dir (which may exist but must be
// empty), giving every file to ra. PG_VERSION is written last: a copy cut
// short is never mistaken for a cluster.
func copyCluster(template, dir string, ra runAs) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	walkErr := filepath.WalkDir(template, func(src string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(template, src)
		if err != nil {
			return err
		}
		if rel == "." || rel == "PG_VERSION" || rel == "postmaster.pid" {
			return nil
		}
		return copyEntry(src, filepath.Join(dir, rel), d, ra)
	})
	if walkErr != nil {
		return fmt.Errorf("copy template %s to %s: %w", template, dir, walkErr)
	}
	d, err := os.Lstat(filepath.Join(template, "PG_VERSION"))
	if err != nil {
		return fmt.Errorf("copy template: %w", err)
	}
	if err := copyEntry(filepath.Join(template, "PG_VERSION"), filepath.Join(dir, "PG_VERSION"), fs.FileInfoToDirEntry(d), ra); err != nil {
		return fmt.Errorf("copy template: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("chmod data dir: %w", err)
	}
	return ra.chown(dir)
}

func copyEntry(src, dst string, d fs.DirEntry, ra runAs) error {
	info, err := d.Info()
	if err != nil {
		return err
	}
	switch {
	case d.IsDir():
		if err := os.Mkdir(dst, info.Mode().Perm()); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	case d.Type()&fs.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		if err := os.Symlink(target, dst); err != nil {
			return err
		}
	case d.Type().IsRegular():
		if err := copyFile(src, dst, info.Mode().Perm()); err != nil {
			return err
		}
	default:
		return nil // sockets, pipes: nothing a template needs
	}
	return ra.chown(dst)
}

func copyFile(src, dst string, perm fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil { // copy_file_range on Linux
		out.Close()
		return err
	}
	return out.Close()
}

// chownTree gives dir and everything below it to ra (a reused data dir that
// an earlier run, as another user, left behind).
func chownTree(dir string, ra runAs) error {
	return filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return ra.chown(p)
	})
}

// pgEnv is the environment the PostgreSQL programs run with: the caller's,
// minus PG* variables that would change what they do.
func pgEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PG") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// tail returns the last n bytes of b, starting at a line boundary if possible.
func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 && i < len(b)-1 {
			b = b[i+1:]
		}
	}
	return strings.TrimRight(string(b), "\n")
}
