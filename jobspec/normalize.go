package jobspec

import (
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/hashicorp/nomad/api"
)

// Group meta of a worker's own Nomad group, when the scheduler splits a
// group per worker to pin each to its node (see scheduler/nomad.Pin).
const (
	MetaGroup = "cohort.group"
	MetaRank  = "cohort.rank"
)

// MetaRun marks a Nomad job cohort registered itself with the run of the
// gang it registered, so a registration of a run that has ended (one that
// a deposed leader made late, say) is never taken for a new gang
// registered behind cohort's back.
const MetaRun = "cohort.run"

// MetaMounts holds the leader's signature of a gang's volume mounts, made
// when it admitted the gang after checking that the caller may mount
// them: cohort registers the gang with its own token, which may mount any
// volume, so it registers only mounts it signed.
const MetaMounts = "cohort.mounts"

// BarrierTaskName is the prestart task cohort adds to every group whose
// driver has no start barrier of its own.
const BarrierTaskName = "cohort-barrier"

// BarrierProgram is the barrier task's program inside the task directory.
const BarrierProgram = "local/cohort-barrier"

// Environment of the barrier task.
const (
	EnvServers     = "COHORT_SERVERS"      // the servers' API addresses, comma-separated
	EnvGangTimeout = "COHORT_GANG_TIMEOUT" // how long to wait for a verdict before giving up
	// EnvBarrierToken authenticates a barrier task's reports; EnvCAPEM is
	// the servers' CA certificate, for servers that speak TLS.
	EnvBarrierToken = "COHORT_BARRIER_TOKEN"
	EnvCAPEM        = "COHORT_CA_PEM"
	// EnvTokenFromVariable says the token comes from the job's Nomad
	// variable through the task's template (see BarrierTask).
	EnvTokenFromVariable = "COHORT_BARRIER_TOKEN_FROM_VARIABLE"
)

// Barrier task resources: a static program that waits on one HTTP call.
// Nomad counts a prestart task as the larger of it and the main task, so
// this costs the group nothing beside any real worker.
const (
	barrierCPU      = 20
	barrierMemoryMB = 16
)

// BarrierTask is where the barrier task's program comes from and whom it
// reports to; the cohort server fills it in.
type BarrierTask struct {
	// Source is the artifact URL of an archive holding cohort-barrier.
	Source string
	// Checksum is the archive's "sha256:<hex>", checked by Nomad's
	// artifact fetcher.
	Checksum string
	// Servers are the cohort servers' API addresses.
	Servers []string
	// Token authenticates the task's reports for this one job; CAPEM is
	// the servers' CA certificate when they speak TLS.
	Token, CAPEM string
	// TokenInVariable delivers the token in a Nomad variable instead of
	// the task's environment, where every holder of read-job on the
	// namespace could read it: the server sets the item BarrierTokenItem
	// of the job's variable (BarrierTokenPath) and the task's template
	// reads it with its workload identity. Token then rides in the
	// environment only for jobs whose ID Nomad cannot name a variable by.
	TokenInVariable bool
}

// BarrierTokenItem is the item of the job's variable that holds its
// barrier token; the server leaves the variable's other items alone.
const BarrierTokenItem = "cohort_barrier_token"

// barrierTokenPathChars is what Nomad 1.6 accepts in a variable path.
var barrierTokenPathChars = regexp.MustCompile(`^[a-zA-Z0-9_~/-]{1,128}$`)

// BarrierTokenPath is the Nomad variable that holds a job's barrier token:
// the job's own, which the workload identity of every task of the job may
// read, including the one-worker groups a gang's uneven placement splits
// it into (whose names, "g[0]", no variable path can hold). ok is false
// when Nomad cannot hold the path (a job ID with a dot, say, or one past
// 117 bytes).
func BarrierTokenPath(jobID string) (path string, ok bool) {
	path = "nomad/jobs/" + jobID
	if strings.Count(path, "/") != 2 || !barrierTokenPathChars.MatchString(path) {
		return "", false
	}
	return path, true
}

// MaxJobIDLength bounds gang job IDs: they travel in URLs, Consul names
// and log lines.
const MaxJobIDLength = 128

var namespaceName = regexp.MustCompile(`^[a-zA-Z0-9-]{1,128}$`)

// ValidateJobID checks a gang's job ID as Nomad does (not empty, no space,
// no NUL) and as cohort needs it: at most 128 bytes of printable UTF-8
// without a slash, since the ID is a path segment of cohort's API and part
// of the job's key.
func ValidateJobID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("the job has no ID")
	case len(id) > MaxJobIDLength:
		return fmt.Errorf("job ID %.32q... is %d bytes long; at most %d are allowed", id, len(id), MaxJobIDLength)
	case !utf8.ValidString(id):
		return fmt.Errorf("job ID %q is not valid UTF-8", id)
	case strings.ContainsAny(id, " /"):
		return fmt.Errorf("job ID %q contains a space or a slash; a gang's ID may contain neither", id)
	}
	for _, r := range id {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("job ID %q contains the unprintable character %U", id, r)
		}
	}
	return nil
}

// ValidateNamespace checks a namespace name as Nomad does; "" is the
// default namespace.
func ValidateNamespace(ns string) error {
	if ns != "" && !namespaceName.MatchString(ns) {
		return fmt.Errorf("namespace %q is not a valid Nomad namespace name (letters, digits and dashes, at most 128)", ns)
	}
	return nil
}

// Normalize makes a Nomad job carrying cohort's gang meta a gang that
// behaves the same whichever way it arrived (cohort run, the
// Nomad-compatible endpoint, or registered with Nomad directly): a batch
// job whose workers neither restart nor reschedule on their own (a gang is
// handled as a whole), every worker with the COHORT_* environment and its
// own Consul name w<rank>.<address>, and, for drivers without a start
// barrier of their own, cohort's barrier task, which holds the worker's
// main task until the whole gang has started. barrier may be nil when the
// job has only microvm groups.
//
// It returns the normalized copy and one note for each change a user
// would not expect (the job is left as it was); a job it cannot make a
// gang is refused with a sentence saying what to change. Normalizing a
// normalized job changes nothing and notes nothing.
func Normalize(job *api.Job, barrier *BarrierTask) (*api.Job, []string, error) {
	if job == nil {
		return nil, nil, fmt.Errorf("no job given")
	}
	out, err := CopyJob(job)
	if err != nil {
		return nil, nil, err
	}
	id := deref(out.ID)
	if err := ValidateJobID(id); err != nil {
		return nil, nil, err
	}
	if err := ValidateNamespace(deref(out.Namespace)); err != nil {
		return nil, nil, err
	}
	g, err := GangFromNomad(out)
	if err != nil {
		return nil, nil, err
	}
	if g == nil {
		return nil, nil, fmt.Errorf("job %s carries no %s meta; it is not a cohort gang", id, MetaGang)
	}
	var notes []string
	note := func(format string, args ...any) { notes = append(notes, fmt.Sprintf(format, args...)) }
	switch t := deref(out.Type); t {
	case "":
		out.Type = ptr(api.JobTypeBatch)
	case api.JobTypeBatch:
	default:
		return nil, nil, fmt.Errorf("job %s is of type %q; a gang runs to completion: set type = \"batch\"", id, t)
	}
	if out.Periodic != nil || out.ParameterizedJob != nil {
		return nil, nil, fmt.Errorf("job %s is periodic or parameterized; a gang is one run: remove the periodic or parameterized block", id)
	}
	peers := PeersEnv(g.Groups)
	for i, tg := range out.TaskGroups {
		if err := normalizeGroup(out, tg, g.Groups[i], peers, barrier, note); err != nil {
			return nil, nil, err
		}
	}
	return out, notes, nil
}

func normalizeGroup(job *api.Job, tg *api.TaskGroup, gg GangGroup, peers string, barrier *BarrierTask, note func(string, ...any)) error {
	name := deref(tg.Name)
	if tg.Count == nil {
		tg.Count = ptr(1)
	}
	var worker *api.Task
	var others []string
	for _, t := range tg.Tasks {
		if t.Name == BarrierTaskName {
			continue
		}
		if worker == nil {
			worker = t
		} else {
			others = append(others, t.Name)
		}
	}
	switch {
	case worker == nil:
		return fmt.Errorf("group %q has no task; a gang group runs one worker task", name)
	case len(others) > 0:
		return fmt.Errorf("group %q has %d tasks (%s, %s); a gang group runs one worker task: put each in a group of its own", name, len(others)+1, worker.Name, strings.Join(others, ", "))
	case worker.Lifecycle != nil && worker.Lifecycle.Hook != "":
		return fmt.Errorf("group %q: task %q is a %s task; a gang worker is the group's main task: remove its lifecycle block", name, worker.Name, worker.Lifecycle.Hook)
	}
	if r := worker.Resources; r != nil {
		for _, d := range r.Devices {
			for _, c := range d.Constraints {
				if c == nil {
					continue
				}
				if err := ValidateDeviceConstraint(c.LTarget, c.Operand, c.RTarget); err != nil {
					return fmt.Errorf("group %q: device %q: %w", name, d.Name, err)
				}
			}
		}
	}

	rp := tg.RestartPolicy
	if rp == nil || deref(rp.Attempts) != 0 || deref(rp.Mode) != "fail" {
		if rp == nil || deref(rp.Attempts) != 0 {
			note("group %q: restarts turned off (a gang is restarted whole by cohort, never one worker at a time)", name)
		}
		tg.RestartPolicy = &api.RestartPolicy{Attempts: ptr(0), Mode: ptr("fail")}
	}
	sp := tg.ReschedulePolicy
	if sp == nil || deref(sp.Attempts) != 0 || deref(sp.Unlimited) {
		note("group %q: rescheduling turned off (a gang is requeued whole by cohort)", name)
		tg.ReschedulePolicy = &api.ReschedulePolicy{Attempts: ptr(0), Unlimited: ptr(false)}
	}
	if tg.Meta == nil {
		tg.Meta = map[string]string{}
	}
	tg.Meta[MetaAddress] = gg.Address

	want := map[string]string{
		EnvJob:     deref(job.ID),
		EnvGroup:   name,
		EnvRank:    "${NOMAD_ALLOC_INDEX}",
		EnvSize:    strconv.Itoa(deref(tg.Count)),
		EnvAddress: gg.Address,
		EnvPeers:   peers,
	}
	if worker.Env == nil {
		worker.Env = map[string]string{}
	}
	for _, k := range sortedKeys(want) {
		if v, ok := worker.Env[k]; ok && v != want[k] && k != EnvPeers {
			note("group %q: %s=%q replaced by %q", name, k, v, want[k])
		}
		worker.Env[k] = want[k]
	}
	normalizeService(tg, worker, gg.Address, note)

	// The barrier task: none for microvm (its driver holds the worker);
	// a fresh one otherwise, so a resubmitted job reports to the servers
	// of today.
	tasks := []*api.Task{worker}
	if worker.Driver != DriverMicroVM {
		if barrier == nil || barrier.Source == "" || len(barrier.Servers) == 0 {
			return fmt.Errorf("group %q runs on the %s driver, whose workers cohort holds with its barrier task, and this cohort server has no barrier task to add (start it with -barrier-task, or use the microvm driver)", name, worker.Driver)
		}
		tasks = append([]*api.Task{barrierTask(worker.Driver, barrier, job.Meta[MetaGangTimeout], deref(job.ID))}, tasks...)
	}
	tg.Tasks = tasks
	return nil
}

// normalizeService gives the worker its Consul name: the service
// <address> with the tag w<rank>, advertising the VM's own address under
// microvm.
func normalizeService(tg *api.TaskGroup, t *api.Task, address string, note func(string, ...any)) {
	tag := "w${NOMAD_ALLOC_INDEX}"
	for _, s := range t.Services {
		if s.Name != address {
			continue
		}
		for _, existing := range s.Tags {
			if existing == tag {
				return
			}
		}
		s.Tags = append(s.Tags, tag)
		note("group %q: tag %s added to service %q, the worker's name", deref(tg.Name), tag, address)
		return
	}
	svc := &api.Service{Name: address, Tags: []string{tag}, AddressMode: "auto", Provider: "consul"}
	if t.Driver == DriverMicroVM {
		svc.AddressMode = "driver"
	}
	for _, n := range tg.Networks {
		if len(n.DynamicPorts) > 0 {
			svc.PortLabel = n.DynamicPorts[0].Label
			break
		}
		if len(n.ReservedPorts) > 0 {
			svc.PortLabel = n.ReservedPorts[0].Label
			break
		}
	}
	t.Services = append(t.Services, svc)
	note("group %q: service %q with tag w<rank> added, so each worker is w<rank>.%s.service.consul", deref(tg.Name), address, address)
}

// barrierTask is the prestart task that holds a group's worker at the
// start barrier. It runs under exec for exec groups (its program is
// static) and raw_exec for every other driver.
func barrierTask(workerDriver string, b *BarrierTask, gangTimeout, jobID string) *api.Task {
	driver := DriverRawExec
	if workerDriver == DriverExec {
		driver = DriverExec
	}
	if gangTimeout == "" {
		gangTimeout = DefaultGangTimeout.String()
	}
	servers := append([]string(nil), b.Servers...)
	sort.Strings(servers)
	token := b.Token
	var templates []*api.Template
	if path, ok := BarrierTokenPath(jobID); ok && b.TokenInVariable {
		token = ""
		// nomadVar waits for the variable, not for an item of it: a
		// variable of the job's own items without the token renders no
		// token, and cohort-barrier waits; the server's write of the
		// token (adopting a gang registered directly) then restarts the
		// task with it, at once (no splay). Restarts of a task whose
		// report was refused or never made start no new instance at the
		// barrier.
		templates = []*api.Template{{
			EmbeddedTmpl: ptr(fmt.Sprintf("{{ with nomadVar %q }}{{ with .%s.Value }}%s={{ . }}{{ end }}{{ end }}\n", path, BarrierTokenItem, EnvBarrierToken)),
			DestPath:     ptr("secrets/cohort-barrier.env"),
			Envvars:      ptr(true),
			ChangeMode:   ptr("restart"),
			Splay:        ptr(time.Duration(0)),
		}}
	}
	return &api.Task{
		Name:      BarrierTaskName,
		Driver:    driver,
		Lifecycle: &api.TaskLifecycle{Hook: api.TaskLifecycleHookPrestart, Sidecar: false},
		Config:    map[string]any{"command": BarrierProgram},
		Env:       barrierEnv(servers, gangTimeout, token, b.CAPEM, templates != nil),
		Templates: templates,
		Artifacts: []*api.TaskArtifact{{
			GetterSource:  ptr(b.Source),
			GetterOptions: map[string]string{"checksum": b.Checksum},
			RelativeDest:  ptr("local/"),
		}},
		Resources:   &api.Resources{CPU: ptr(barrierCPU), MemoryMB: ptr(barrierMemoryMB)},
		LogConfig:   &api.LogConfig{MaxFiles: ptr(1), MaxFileSizeMB: ptr(1)},
		KillTimeout: ptr(time.Second),
	}
}

func barrierEnv(servers []string, gangTimeout, token, caPEM string, fromVariable bool) map[string]string {
	env := map[string]string{
		EnvServers:     strings.Join(servers, ","),
		EnvGangTimeout: gangTimeout,
	}
	if fromVariable {
		env[EnvTokenFromVariable] = "1"
	}
	if token != "" {
		env[EnvBarrierToken] = token
	}
	if caPEM != "" {
		env[EnvCAPEM] = caPEM
	}
	return env
}

// DeviceOperators are the device constraint operators cohort's placement
// evaluates the way Nomad does; a gang using another would be placed by
// cohort where Nomad refuses it, so it is refused at submission.
var DeviceOperators = []string{"=", "==", "is", "!=", "not", "<", "<=", ">", ">=", "is_set", "is_not_set", "regexp"}

// deviceTarget is what a device constraint may constrain.
var deviceTarget = regexp.MustCompile(`^\$\{device\.(vendor|type|model|attr\.[A-Za-z0-9_.-]+)\}$`)

// ValidateDeviceConstraint checks a device constraint's attribute (in
// Nomad's form, "${device.attr.memory}"), operator ("" is "=") and value,
// which must be a literal: cohort's placement compares attributes with
// values, not with each other.
func ValidateDeviceConstraint(attribute, operator, value string) error {
	if !deviceTarget.MatchString(attribute) {
		return fmt.Errorf("device constraint attribute %q is not one of ${device.vendor}, ${device.type}, ${device.model} or ${device.attr.<name>}", attribute)
	}
	if strings.Contains(value, "${") {
		return fmt.Errorf("device constraint value %q is not a literal; compare the attribute with a value such as \"40 GiB\"", value)
	}
	if operator == "" {
		return nil
	}
	for _, o := range DeviceOperators {
		if o == operator {
			return nil
		}
	}
	return fmt.Errorf("device constraint operator %q is not supported; use one of %s", operator, strings.Join(DeviceOperators, " "))
}

// DeviceAttribute is a constraint's attribute in Nomad's form: a bare
// name ("memory") is the device attribute of that name.
func DeviceAttribute(a string) string {
	if strings.HasPrefix(a, "${") {
		return a
	}
	switch a {
	case "vendor", "type", "model":
		return "${device." + a + "}"
	}
	return "${device.attr." + a + "}"
}

// GroupResources is what one worker of a group holds, as Nomad counts an
// allocation: prestart sidecars plus the largest of the prestart tasks,
// the main tasks and the poststop tasks.
func GroupResources(tg *api.TaskGroup) (cpu, memoryMB int, devices map[string]int) {
	type res struct{ cpu, mem int }
	var sidecars, ephemeral, main, poststop res
	devices = map[string]int{}
	for _, t := range tg.Tasks {
		if t.Resources == nil {
			continue
		}
		r := res{deref(t.Resources.CPU), deref(t.Resources.MemoryMB)}
		lc := t.Lifecycle
		switch {
		case lc == nil || lc.Hook == "" || lc.Hook == api.TaskLifecycleHookPoststart:
			main.cpu, main.mem = main.cpu+r.cpu, main.mem+r.mem
		case lc.Hook == api.TaskLifecycleHookPrestart && lc.Sidecar:
			sidecars.cpu, sidecars.mem = sidecars.cpu+r.cpu, sidecars.mem+r.mem
		case lc.Hook == api.TaskLifecycleHookPrestart:
			ephemeral.cpu, ephemeral.mem = ephemeral.cpu+r.cpu, ephemeral.mem+r.mem
		default:
			poststop.cpu, poststop.mem = poststop.cpu+r.cpu, poststop.mem+r.mem
		}
		for _, d := range t.Resources.Devices {
			devices[d.Name] += int(deref(d.Count))
		}
	}
	// The Connect proxies Nomad adds run beside the tasks, as prestart
	// sidecars.
	for _, p := range connectProxies(tg) {
		sidecars.cpu, sidecars.mem = sidecars.cpu+p.cpu, sidecars.mem+p.mem
	}
	cpu = sidecars.cpu + max(ephemeral.cpu, main.cpu, poststop.cpu)
	memoryMB = sidecars.mem + max(ephemeral.mem, main.mem, poststop.mem)
	return cpu, memoryMB, devices
}

// CopyJob copies a Nomad job deeply, through its JSON form.
func CopyJob(job *api.Job) (*api.Job, error) {
	b, err := json.Marshal(job)
	if err != nil {
		return nil, fmt.Errorf("copying job: %w", err)
	}
	var out api.Job
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("copying job: %w", err)
	}
	return &out, nil
}
