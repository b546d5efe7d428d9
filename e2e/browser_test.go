package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// screenshotDir is where the browser tests leave their screenshots:
// $COHORT_SCREENSHOTS, or cohort-e2e-screenshots in the temp directory.
func screenshotDir(t *testing.T) string {
	dir := os.Getenv("COHORT_SCREENSHOTS")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "cohort-e2e-screenshots")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// browser is a headless Chromium (Debian's chromium, which make tools
// installs) driven over the DevTools protocol.
func browser(t *testing.T) context.Context {
	t.Helper()
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium not found: run make tools (Debian package chromium)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.WindowSize(1400, 1000),
		chromedp.Flag("disable-dev-shm-usage", true))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancel)
	ctx, cancel2 := chromedp.NewContext(actx)
	t.Cleanup(cancel2)
	return ctx
}

// rendered opens url and waits until the page's visible text holds every
// one of want: single-page applications render long after the load
// event, and their long polls never let the network go idle. It saves a
// screenshot named name either way and returns the text.
func rendered(t *testing.T, ctx context.Context, url, name string, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var text string
	err := chromedp.Do(ctx, chromedp.Navigate(url))
	for err == nil {
		if text, err = chromedp.Run(ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`)); err != nil {
			break
		}
		missing := ""
		for _, w := range want {
			if !strings.Contains(text, w) {
				missing = w
				break
			}
		}
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			err = fmt.Errorf("%q never appeared within 90 s", missing)
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if png, serr := chromedp.Run(ctx, chromedp.FullScreenshot(100)); serr == nil {
		path := filepath.Join(screenshotDir(t), name+".png")
		if werr := os.WriteFile(path, png, 0o644); werr == nil {
			t.Logf("screenshot of %s: %s", url, path)
		}
	}
	if err != nil {
		t.Fatalf("%s: %v\npage text:\n%s", url, err, text)
	}
	return text
}

// TestBrowserShowsRunningGang: the Nomad UI's job page of a running gang,
// opened directly and through cohort's Nomad-compatible endpoint, lists
// every worker's allocation as running; cohort's own page shows the gang
// running with its workers. Screenshots of each are saved.
func TestBrowserShowsRunningGang(t *testing.T) {
	c, _ := cluster(t)
	endpoint := freeAddr(t)
	addr := cohortServerAt(t, c, freePort(t), "-nomad-listen", endpoint)
	cohortRun(t, addr, rawGang("seen", 3, "30s", "/bin/sleep", "300"))
	waitStatus(t, addr, "seen", "running")
	var allocs []struct{ ID, ClientStatus string }
	getJSON(t, c.NomadAddr()+"/v1/job/seen/allocations", &allocs)
	want := []string{"seen"}
	for _, a := range allocs {
		want = append(want, a.ID[:8])
	}
	if len(allocs) != 3 {
		t.Fatalf("%d allocations", len(allocs))
	}
	ctx := browser(t)
	for _, base := range []struct{ name, url string }{{"nomad-ui-job", c.NomadAddr()}, {"nomad-ui-job-via-cohort", "http://" + endpoint}} {
		text := rendered(t, ctx, base.url+"/ui/jobs/seen@default", base.name, want...)
		if n := strings.Count(text, "running"); n < 3 {
			t.Errorf("%s: %d mentions of running, want every worker's:\n%s", base.name, n, text)
		}
	}
	text := rendered(t, ctx, addr+"/ui/?refresh=0", "cohort-ui", "seen", "running", "w[0]", "w[1]", "w[2]")
	if !strings.Contains(text, "\tleader") {
		t.Errorf("cohort's page does not show the leader:\n%s", text)
	}
}
