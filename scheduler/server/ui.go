package server

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// cohort's own page, /ui/: the queue with why each gang waits, the gangs
// with their workers, deadlines and bills, and the server group. It is
// rendered on the server from one template, refreshes itself, and needs
// no JavaScript. It shows what the caller's Nomad token may read, like
// the API; a browser sends the token in a cookie set by the page's form
// (SameSite=Strict, HttpOnly), read only by this page, so the cookie can
// never submit or stop anything.

//go:embed ui/page.html
var uiFS embed.FS

var uiPage = template.Must(template.New("page.html").Funcs(template.FuncMap{
	"inc":   func(i int) int { return i + 1 },
	"deref": func(p *int) int { return *p },
}).ParseFS(uiFS, "ui/page.html"))

const (
	uiCookie = "cohort-token"
	// uiWorkersShown bounds the gangs whose workers are read from Nomad
	// per render: reserved and running ones, the newest first.
	uiWorkersShown = 10
	uiGangsShown   = 200
)

type uiData struct {
	Self, Leader, Now string
	Refresh           int
	Denied            string
	AskToken          bool
	Queue             []uiQueued
	Gangs             []uiGang
	Members           []api.MemberView
	MembersNote       string
}

type uiQueued struct {
	Key, Submitted, Why string
	Priority, Workers   int
}

type uiGang struct {
	Key, Status, Reason            string
	Workers                        int
	Started, Deadline, Ended, Bill string
	WorkerRows                     []api.WorkerView
}

func (s *Server) handleUI(w http.ResponseWriter, r *http.Request) {
	c := s.callerOf(r)
	if c.token == "" {
		if ck, err := r.Cookie(uiCookie); err == nil {
			c.token = ck.Value
		}
	}
	now := s.now()
	d := uiData{Self: s.self.ID, Now: now.UTC().Format(time.DateTime + " UTC"), Refresh: 2}
	// ?refresh=N sets the period (0: never, for a page read once, as the
	// browser tests read it).
	if v, err := strconv.Atoi(r.URL.Query().Get("refresh")); err == nil && v >= 0 && v <= 3600 {
		d.Refresh = v
	}
	d.AskToken = c.token == "" && s.aclsOn()
	leaderAddr, leaderID := s.r.Leader()
	d.Leader = leaderID
	if d.Leader == "" {
		d.Leader = leaderAddr
	}
	var jobs []state.Job
	var queued []*placement.Job
	s.r.Read(func(st *state.State) {
		for _, j := range st.Jobs {
			jobs = append(jobs, j.Clone())
		}
		queued = queuedInOrder(st)
	})
	may := map[string]bool{}
	readable := func(ns string) bool {
		ok, asked := may[ns]
		if !asked {
			err := s.mayRead(c, ns)
			ok = err == nil
			may[ns] = ok
			if err != nil && d.Denied == "" {
				d.Denied = "Some gangs are hidden from this token."
			}
		}
		return ok
	}
	notes := s.waiting()
	byKey := map[string]state.Job{}
	for _, j := range jobs {
		byKey[j.Key()] = j
	}
	for _, q := range queued {
		if !readable(q.Namespace) {
			continue
		}
		j := byKey[q.Key()]
		why := j.Reason
		if n, ok := notes[q.Key()]; ok {
			why = joinNonEmpty(why, s.waitText(c, n))
		}
		d.Queue = append(d.Queue, uiQueued{Key: q.Key(), Priority: q.Priority, Workers: q.Size(), Submitted: stamp(j.SubmittedAt), Why: why})
	}
	sort.Slice(jobs, func(a, b int) bool { return jobs[a].SubmittedAt.After(jobs[b].SubmittedAt) })
	shownWorkers := 0
	for _, j := range jobs {
		if len(d.Gangs) == uiGangsShown {
			break
		}
		if !readable(j.Spec.Namespace) {
			continue
		}
		g := uiGang{Key: j.Key(), Status: string(j.Status), Reason: j.Reason, Workers: j.Spec.Size(),
			Started: stamp(j.StartedAt), Ended: stamp(j.EndedAt)}
		if !j.StartedAt.IsZero() {
			g.Deadline = stamp(j.Deadline())
			b := billing.For(&j, s.prices, now)
			g.Bill = fmt.Sprintf("%.6f %s", b.Total, b.Currency)
			if b.Open {
				g.Bill += " (open)"
			}
		}
		if (j.Status == state.Reserved || j.Status == state.Running) && j.NomadIndex != 0 && shownWorkers < uiWorkersShown {
			shownWorkers++
			if a, err := s.nomad.Allocs(j.Spec.Namespace, j.Spec.ID, j.NomadVersion); err == nil {
				g.WorkerRows = workerViews(&j, a)
			} else {
				g.Reason = joinNonEmpty(g.Reason, "workers unknown: "+err.Error())
			}
		}
		d.Gangs = append(d.Gangs, g)
	}
	if err := s.mayOperate(c); err != nil {
		d.MembersNote = "The server group is shown to management tokens."
	} else if ms, err := s.members(); err != nil {
		d.MembersNote = err.Error()
	} else {
		d.Members = ms
	}
	var buf bytes.Buffer
	if err := uiPage.Execute(&buf, d); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("rendering the page: %w", err))
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")
	w.Header().Set("X-Frame-Options", "DENY")
	w.Write(buf.Bytes())
}

// handleUIToken keeps the token a user typed into the page in a cookie
// only the page reads.
func (s *Server) handleUIToken(w http.ResponseWriter, r *http.Request) {
	if o := r.Header.Get("Origin"); o != "" {
		if u, err := url.Parse(o); err != nil || u.Host != r.Host {
			writeErr(w, http.StatusForbidden, errors.New("the token form is taken from this server's own page only"))
			return
		}
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxSmallBody)
	if err := r.ParseForm(); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	http.SetCookie(w, &http.Cookie{Name: uiCookie, Value: r.PostForm.Get("token"), Path: "/ui/",
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
	http.Redirect(w, r, "/ui/", http.StatusSeeOther)
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.TimeOnly)
}

func joinNonEmpty(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + "; " + b
}
