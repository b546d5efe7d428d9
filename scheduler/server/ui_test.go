package server

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
)

// The page shows the queue with why each gang waits, the gangs with
// their workers, deadline and bill, and the server group; with Nomad's
// ACLs on, only what the token may read, the token coming from the
// page's cookie.
func TestUIPage(t *testing.T) {
	h := newHarness(t)
	h.submit(gang("big", jobspec.DriverMicroVM, 14))
	h.submit(gang("next", jobspec.DriverMicroVM, 4))
	for i, a := range h.nomad.live("big") {
		h.srv.Boot("", "big", api.BarrierRequest{Alloc: a.ID, Instance: "i" + string(rune('a'+i))})
	}
	h.advance(10 * time.Millisecond)
	h.pass()
	page := func(req *http.Request) string {
		rec := h.serve(req)
		if rec.Code != http.StatusOK || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/html") {
			t.Fatalf("GET /ui/: %d %s", rec.Code, rec.Body)
		}
		return rec.Body.String()
	}
	out := page(httptest.NewRequest(http.MethodGet, "/ui/", nil))
	for _, want := range []string{
		"<code>next</code>", "waits for room: needs 4 workers",
		"<code>big</code>", `class="running">running`, "<td>a[13]</td>", "(open)",
		`<span class="running">leader</span>`, ">s1<",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(out, "<script") {
		t.Error("the page has a script")
	}

	h.nomad.acl = map[string]fakeToken{"reader": {read: map[string]bool{"default": true}}}
	h.srv.acl = aclCache{} // forget that ACLs were off
	out = page(httptest.NewRequest(http.MethodGet, "/ui/", nil))
	if strings.Contains(out, "<code>big</code>") || !strings.Contains(out, "Some gangs are hidden") || !strings.Contains(out, `action="/ui/token"`) {
		t.Errorf("anonymous page shows gangs or no token form:\n%s", out)
	}
	req := httptest.NewRequest(http.MethodGet, "/ui/", nil)
	req.AddCookie(&http.Cookie{Name: uiCookie, Value: "reader"})
	if out = page(req); !strings.Contains(out, "<code>big</code>") || strings.Contains(out, ">s1<") {
		t.Errorf("a reader's page: gangs missing, or the server group shown to a non-management token")
	}
	// The cookie is the page's only: the API does not take it.
	req = httptest.NewRequest(http.MethodGet, "/v1/job/big", nil)
	req.AddCookie(&http.Cookie{Name: uiCookie, Value: "reader"})
	if rec := h.serve(req); rec.Code != http.StatusForbidden {
		t.Errorf("the API took the page's cookie: %d", rec.Code)
	}
	// The form sets it, from the page's own origin only.
	form := func(origin string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, "/ui/token", strings.NewReader("token=reader"))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if origin != "" {
			r.Header.Set("Origin", origin)
		}
		return h.serve(r)
	}
	if rec := form("http://evil.test"); rec.Code != http.StatusForbidden {
		t.Errorf("a foreign origin set the token: %d", rec.Code)
	}
	rec := form("http://" + httptest.NewRequest(http.MethodGet, "/", nil).Host)
	if rec.Code != http.StatusSeeOther || !strings.Contains(rec.Header().Get("Set-Cookie"), "HttpOnly") || !strings.Contains(rec.Header().Get("Set-Cookie"), "SameSite=Strict") {
		t.Errorf("token form: %d %q", rec.Code, rec.Header().Get("Set-Cookie"))
	}
}
