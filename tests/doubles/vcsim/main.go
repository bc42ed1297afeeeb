// standby-vcsim: a govmomi 0.24 vCenter simulator behind a TLS front that adds what the
// simulator lacks for CBT-based backup tests: QueryChangedDiskAreas, change IDs on disk
// backings, capacityInBytes, a session check on /folder and a JSON test-control API.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"flag"
	"fmt"
	"html"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const user, pass = "user", "pass"

type area struct{ start, end int64 }
type write struct {
	seq int64
	area
}

// diskState is the change log of one virtual disk (VM moref + device key).
type diskState struct {
	uuid          string
	seq, resetSeq int64
	log           []write
	file, dsPath  string
	capacity      int64
}

type snapRec struct {
	uuid string
	seq  int64
}

type front struct {
	mu        sync.Mutex
	disks     map[string]*diskState
	snaps     map[string]map[int32]snapRec
	cbt       map[string]bool
	backend   *url.URL
	client    *http.Client
	proxy     *httputil.ReverseProxy
	pageAreas int
	pageBytes int64
	diskBytes int64
	stop      chan struct{}
}

func (d *diskState) changeID() string { return fmt.Sprintf("%s/%d", d.uuid, d.seq) }

func vmDisks(vm *simulator.VirtualMachine) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	for _, dev := range vm.Config.Hardware.Device {
		if d, ok := dev.(*types.VirtualDisk); ok {
			out = append(out, d)
		}
	}
	return out
}

func findVM(name string) *simulator.VirtualMachine {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm := e.(*simulator.VirtualMachine); vm.Name == name {
			return vm
		}
	}
	return nil
}

// state returns (creating it on first use) the change log of a disk; f.mu and the VM lock held.
func (f *front) state(vm *simulator.VirtualMachine, d *types.VirtualDisk) *diskState {
	id := fmt.Sprintf("%s/%d", vm.Self.Value, d.Key)
	if st := f.disks[id]; st != nil {
		b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || b.FileName == st.dsPath {
			return st
		}
		// the disk now backs onto another file (a reconfigure swapped it): a new disk to CBT
	}
	if f.diskBytes > 0 && d.CapacityInKB*1024 < f.diskBytes {
		d.CapacityInKB = f.diskBytes / 1024
	}
	d.CapacityInBytes = d.CapacityInKB * 1024
	st := &diskState{uuid: uuid.New().String(), capacity: d.CapacityInBytes}
	if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
		st.dsPath = b.FileName
		dsName, rel := "", b.FileName
		if i := strings.Index(rel, "]"); strings.HasPrefix(rel, "[") && i > 0 {
			dsName, rel = rel[1:i], strings.TrimSpace(rel[i+1:])
		}
		for _, e := range simulator.Map.All("Datastore") {
			if ds := e.(*simulator.Datastore); ds.Name == dsName {
				st.file = filepath.Join(ds.Info.GetDatastoreInfo().Url, strings.TrimSuffix(rel, ".vmdk")+"-flat.vmdk")
			}
		}
		if st.file != "" {
			writeDescriptor(strings.TrimSuffix(st.file, "-flat.vmdk")+".vmdk", filepath.Base(st.file), st.capacity)
			if fi, err := os.Stat(st.file); err != nil || fi.Size() < st.capacity {
				_ = os.MkdirAll(filepath.Dir(st.file), 0o755)
				if fh, err := os.OpenFile(st.file, os.O_RDWR|os.O_CREATE, 0o644); err == nil {
					_ = fh.Truncate(st.capacity)
					_ = fh.Close()
				}
			}
		}
	}
	f.disks[id] = st
	return st
}

// writeDescriptor gives a flat disk the text descriptor ESXi keeps beside its extent (the
// simulator leaves an empty file); an existing non-empty descriptor is left alone.
func writeDescriptor(path, extent string, capacity int64) {
	if fi, err := os.Stat(path); err == nil && fi.Size() > 0 {
		return
	}
	text := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"+
		"createType=\"vmfs\"\n\n# Extent description\nRW %d VMFS \"%s\"\n\n#DDB\n"+
		"ddb.adapterType = \"lsilogic\"\n", capacity/512, extent)
	_ = os.MkdirAll(filepath.Dir(path), 0o755)
	_ = os.WriteFile(path, []byte(text), 0o644)
}

// renumberDisks gives the model's disks vSphere's usual keys (2000, 2001, ...) at start;
// the 0.24 simulator picks arbitrary ones.
func renumberDisks(vm *simulator.VirtualMachine) {
	simulator.Map.WithLock(vm, func() {
		for i, d := range vmDisks(vm) {
			old, key := d.Key, int32(2000+i)
			d.Key = key
			if vm.Layout != nil {
				for j := range vm.Layout.Disk {
					if vm.Layout.Disk[j].Key == old {
						vm.Layout.Disk[j].Key = key
					}
				}
			}
			if vm.LayoutEx != nil {
				for j := range vm.LayoutEx.Disk {
					if vm.LayoutEx.Disk[j].Key == old {
						vm.LayoutEx.Disk[j].Key = key
					}
				}
			}
		}
	})
}

// syncVM makes the VM's disks show capacityInBytes and (with CBT on) their current changeId.
func (f *front) syncVM(vm *simulator.VirtualMachine) {
	simulator.Map.WithLock(vm, func() {
		on := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		for _, d := range vmDisks(vm) {
			st := f.state(vm, d)
			if on && !f.cbt[vm.Self.Value] { // enabling CBT starts a new change-tracking epoch
				st.uuid, st.resetSeq = uuid.New().String(), st.seq
			}
			if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				b.ChangeId = ""
				if on {
					b.ChangeId = st.changeID()
				}
			}
		}
		f.cbt[vm.Self.Value] = on
	})
}

// onSnapshot records each disk's sequence for a new snapshot and gives the snapshot its own
// copy of the disks (the 0.24 simulator shares the VM's device objects) carrying the changeId.
func (f *front) onSnapshot(vm *simulator.VirtualMachine, snap *simulator.VirtualMachineSnapshot) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncVM(vm)
	rec := map[int32]snapRec{}
	simulator.Map.WithLock(snap, func() {
		devs := make([]types.BaseVirtualDevice, 0, len(snap.Config.Hardware.Device))
		for _, dev := range snap.Config.Hardware.Device {
			if d, ok := dev.(*types.VirtualDisk); ok {
				st := f.disks[fmt.Sprintf("%s/%d", vm.Self.Value, d.Key)]
				nd := *d
				if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && st != nil {
					nb := *b
					nd.Backing = &nb
					rec[d.Key] = snapRec{st.uuid, st.seq}
				}
				dev = &nd
			}
			devs = append(devs, dev)
		}
		snap.Config.Hardware.Device = devs
	})
	f.snaps[snap.Self.Value] = rec
}

// soapFields returns the first element inside the SOAP Body and the text of its children.
func soapFields(body []byte) (string, map[string]string) {
	dec := xml.NewDecoder(bytes.NewReader(body))
	method, fields, depth, cur, inBody := "", map[string]string{}, 0, "", false
	for {
		tok, err := dec.Token()
		if err != nil {
			return method, fields
		}
		switch t := tok.(type) {
		case xml.StartElement:
			depth++
			if depth == 2 {
				inBody = t.Name.Local == "Body"
			} else if depth == 3 && inBody && method == "" {
				method = t.Name.Local
			} else if depth == 4 && inBody && method != "" {
				cur = t.Name.Local
			}
		case xml.CharData:
			if depth == 4 && inBody && cur != "" {
				if _, seen := fields[cur]; !seen {
					fields[cur] = strings.TrimSpace(string(t))
				}
			}
		case xml.EndElement:
			if depth == 4 {
				cur = ""
			}
			depth--
		}
	}
}

const envHead = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
const envTail = `</soapenv:Body></soapenv:Envelope>`

func soapFault(w http.ResponseWriter, kind, field, value, msg string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `%s<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring><detail><%sFault xmlns="urn:vim25" xsi:type="%s"><%s>%s</%s></%sFault></detail></soapenv:Fault>%s`,
		envHead, html.EscapeString(msg), kind, kind, field, html.EscapeString(value), field, kind, envTail)
}

func invalidArg(w http.ResponseWriter, prop, msg string) {
	soapFault(w, "InvalidArgument", "invalidProperty", prop, msg)
}

// allocated lists the data extents of file within [start, end) using SEEK_DATA/SEEK_HOLE.
func allocated(file string, start, end int64) []area {
	fh, err := os.Open(file)
	if err != nil {
		return nil
	}
	defer fh.Close()
	var out []area
	for off := start; off < end; {
		d, err := fh.Seek(off, 3) // SEEK_DATA
		if err != nil || d >= end {
			break
		}
		h, err := fh.Seek(d, 4) // SEEK_HOLE
		if err != nil {
			h = end
		}
		out = append(out, area{d, minI(h, end)})
		off = h
	}
	return out
}

func minI(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

func merge(in []area) []area {
	sort.Slice(in, func(i, j int) bool { return in[i].start < in[j].start })
	var out []area
	for _, a := range in {
		if n := len(out); n > 0 && a.start <= out[n-1].end {
			if a.end > out[n-1].end {
				out[n-1].end = a.end
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

func (f *front) queryChangedDiskAreas(w http.ResponseWriter, p map[string]string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	vm, _ := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: p["_this"]}).(*simulator.VirtualMachine)
	if vm == nil {
		invalidArg(w, "_this", "virtual machine not found: "+p["_this"])
		return
	}
	key, _ := strconv.Atoi(p["deviceKey"])
	start, err := strconv.ParseInt(p["startOffset"], 10, 64)
	var st *diskState
	var cbtOn bool
	simulator.Map.WithLock(vm, func() {
		cbtOn = vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
		for _, d := range vmDisks(vm) {
			if int(d.Key) == key {
				st = f.state(vm, d)
			}
		}
	})
	switch {
	case st == nil:
		invalidArg(w, "deviceKey", "no virtual disk with key "+p["deviceKey"])
		return
	case !cbtOn:
		soapFault(w, "FileFault", "file", st.dsPath, "change tracking is not enabled on the virtual machine")
		return
	case err != nil || start < 0 || start >= st.capacity:
		invalidArg(w, "startOffset", "startOffset out of range: "+p["startOffset"])
		return
	}
	snapUUID, snapSeq := st.uuid, st.seq
	if s := p["snapshot"]; s != "" {
		rec, ok := f.snaps[s][int32(key)]
		if !ok {
			invalidArg(w, "snapshot", "unknown snapshot "+s)
			return
		}
		snapUUID, snapSeq = rec.uuid, rec.seq
	}
	end := minI(start+f.pageBytes, st.capacity)
	var areas []area
	if cid := p["changeId"]; cid == "*" {
		areas = merge(allocated(st.file, start, end))
	} else {
		i := strings.LastIndex(cid, "/")
		seq, perr := strconv.ParseInt(cid[i+1:], 10, 64)
		switch {
		case i <= 0 || perr != nil:
			invalidArg(w, "changeId", "malformed changeId "+cid)
			return
		case cid[:i] != st.uuid || snapUUID != st.uuid || seq < st.resetSeq:
			soapFault(w, "FileFault", "file", st.dsPath, "change tracking information is invalid or was reset for "+cid)
			return
		case seq > snapSeq:
			invalidArg(w, "changeId", "changeId is newer than the snapshot: "+cid)
			return
		}
		for _, e := range st.log {
			if e.seq > seq && e.seq <= snapSeq && e.end > start && e.start < end {
				areas = append(areas, area{maxI(e.start, start), minI(e.end, end)})
			}
		}
		areas = merge(areas)
	}
	length := end - start
	if len(areas) > f.pageAreas {
		areas = areas[:f.pageAreas]
		length = areas[len(areas)-1].end - start
	}
	var b strings.Builder
	fmt.Fprintf(&b, `%s<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset><length>%d</length>`, envHead, start, length)
	for _, a := range areas {
		fmt.Fprintf(&b, `<changedArea><start>%d</start><length>%d</length></changedArea>`, a.start, a.end-a.start)
	}
	b.WriteString(`</returnval></QueryChangedDiskAreasResponse>` + envTail)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	_, _ = io.WriteString(w, b.String())
}

func maxI(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// sdk answers QueryChangedDiskAreas itself and passes every other call to the simulator,
// fixing up change IDs after CreateSnapshot_Task and ReconfigVM_Task.
func (f *front) sdk(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	method, p := soapFields(body)
	if method == "QueryChangedDiskAreas" {
		f.queryChangedDiskAreas(w, p)
		return
	}
	var snapVM *types.ManagedObjectReference // the VM of a snapshot task, see below
	if snap, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: p["_this"]}).(*simulator.VirtualMachineSnapshot); ok {
		snapVM = &snap.Vm
	}
	req, _ := http.NewRequest(r.Method, f.backend.String()+r.URL.RequestURI(), bytes.NewReader(body))
	req.Header = r.Header.Clone()
	res, err := f.client.Do(req)
	if err != nil && method == "Fetch" {
		// 0.24's Fetch panics on an unset property (e.g. vm.snapshot after the last
		// snapshot is removed); vSphere answers it as unset.
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		_, _ = io.WriteString(w, envHead+`<FetchResponse xmlns="urn:vim25"></FetchResponse>`+envTail)
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer res.Body.Close()
	out, _ := io.ReadAll(res.Body)
	if snapVM != nil && strings.HasSuffix(method, "_Task") && res.StatusCode == http.StatusOK {
		// 0.24 makes the snapshot the task's entity, which pyvmomi rejects (not a
		// ManagedEntity); vSphere names the VM.
		_, rp := soapFields(out)
		if t, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: rp["returnval"]}).(*simulator.Task); ok {
			simulator.Map.WithLock(t, func() { t.Info.Entity = snapVM })
		}
	}
	vm, _ := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: p["_this"]}).(*simulator.VirtualMachine)
	if res.StatusCode == http.StatusOK && vm != nil {
		switch method {
		case "ReconfigVM_Task":
			f.mu.Lock()
			f.syncVM(vm)
			f.mu.Unlock()
		case "CreateSnapshot_Task":
			_, rp := soapFields(out)
			if t, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: rp["returnval"]}).(*simulator.Task); ok {
				if ref, ok := t.Info.Result.(types.ManagedObjectReference); ok {
					if snap, ok := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot); ok {
						f.onSnapshot(vm, snap)
					}
				}
			}
		}
	}
	for k, v := range res.Header {
		w.Header()[k] = v
	}
	w.Header().Del("Content-Length")
	w.WriteHeader(res.StatusCode)
	_, _ = w.Write(out)
}

// authorized accepts basic auth with the simulator's login or a live vmware_soap_session
// cookie (checked by asking the simulator for the session's currentSession).
func (f *front) authorized(r *http.Request) bool {
	if u, p, ok := r.BasicAuth(); ok {
		return u == user && p == pass
	}
	if _, err := r.Cookie("vmware_soap_session"); err != nil {
		return false
	}
	q := envHead + `<RetrievePropertiesEx xmlns="urn:vim25"><_this type="PropertyCollector">propertyCollector</_this><specSet><propSet><type>SessionManager</type><pathSet>currentSession</pathSet></propSet><objectSet><obj type="SessionManager">SessionManager</obj></objectSet></specSet><options/></RetrievePropertiesEx>` + envTail
	req, _ := http.NewRequest(http.MethodPost, f.backend.String()+"/sdk", strings.NewReader(q))
	req.Header.Set("Content-Type", "text/xml; charset=utf-8")
	req.Header.Set("SOAPAction", "urn:vim25/7.0")
	req.Header.Set("Cookie", r.Header.Get("Cookie"))
	res, err := f.client.Do(req)
	if err != nil {
		return false
	}
	defer res.Body.Close()
	out, _ := io.ReadAll(res.Body)
	return res.StatusCode == http.StatusOK && bytes.Contains(out, []byte("UserSession"))
}

func jsonReply(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// control serves the /standby/ test-control API.
func (f *front) control(w http.ResponseWriter, r *http.Request) {
	var in struct {
		VM     string `json:"vm"`
		Disk   int32  `json:"disk"`
		Offset int64  `json:"offset"`
		Data   []byte `json:"data"`
		Free   *int64 `json:"freeBytes"`
	}
	in.VM = r.URL.Query().Get("vm")
	if r.Method == http.MethodPost && r.URL.Path != "/standby/stop" {
		if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
			jsonReply(w, 400, map[string]string{"error": err.Error()})
			return
		}
	}
	if r.URL.Path == "/standby/stop" {
		jsonReply(w, 200, map[string]bool{"stopping": true})
		close(f.stop)
		return
	}
	if r.URL.Path == "/standby/datastore" { // what vCenter reports free (a full datastore)
		var free int64
		for _, e := range simulator.Map.All("Datastore") {
			ds := e.(*simulator.Datastore)
			simulator.Map.WithLock(ds, func() {
				if in.Free != nil {
					ds.Summary.FreeSpace = *in.Free
					ds.Info.GetDatastoreInfo().FreeSpace = *in.Free
				}
				free = ds.Summary.FreeSpace
			})
		}
		jsonReply(w, 200, map[string]int64{"freeBytes": free})
		return
	}
	vm := findVM(in.VM)
	if vm == nil {
		jsonReply(w, 404, map[string]string{"error": "no VM named " + in.VM})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncVM(vm)
	var disks []*types.VirtualDisk
	simulator.Map.WithLock(vm, func() { disks = vmDisks(vm) })
	var st *diskState
	var list []map[string]interface{}
	for _, d := range disks {
		s := f.disks[fmt.Sprintf("%s/%d", vm.Self.Value, d.Key)]
		if d.Key == in.Disk {
			st = s
		}
		list = append(list, map[string]interface{}{"deviceKey": d.Key, "file": s.file, "datastorePath": s.dsPath,
			"capacityBytes": s.capacity, "changeId": s.changeID(), "cbtEnabled": f.cbt[vm.Self.Value]})
	}
	if r.URL.Path == "/standby/disks" {
		jsonReply(w, 200, list)
		return
	}
	if st == nil {
		jsonReply(w, 404, map[string]string{"error": fmt.Sprintf("no disk %d on %s", in.Disk, in.VM)})
		return
	}
	switch r.URL.Path {
	case "/standby/write":
		end := in.Offset + int64(len(in.Data))
		if in.Offset < 0 || end > st.capacity || len(in.Data) == 0 {
			jsonReply(w, 400, map[string]string{"error": "write outside the disk or empty"})
			return
		}
		fh, err := os.OpenFile(st.file, os.O_RDWR, 0)
		if err == nil {
			_, err = fh.WriteAt(in.Data, in.Offset)
			_ = fh.Close()
		}
		if err != nil {
			jsonReply(w, 500, map[string]string{"error": err.Error()})
			return
		}
		st.seq++
		st.log = append(st.log, write{st.seq, area{in.Offset &^ 511, minI((end+511)&^511, st.capacity)}})
	case "/standby/reset-cbt":
		st.uuid, st.resetSeq = uuid.New().String(), st.seq
	default:
		jsonReply(w, 404, map[string]string{"error": "unknown endpoint"})
		return
	}
	f.syncVM(vm) // CBT state already synced above: this only refreshes the backings' changeId
	jsonReply(w, 200, map[string]interface{}{"seq": st.seq, "changeId": st.changeID()})
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/standby/"):
		f.control(w, r)
	case r.URL.Path == "/sdk" && r.Method == http.MethodPost:
		f.sdk(w, r)
	case strings.HasPrefix(r.URL.Path, "/folder"):
		if !f.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
			http.Error(w, "authentication required", http.StatusUnauthorized)
			return
		}
		f.proxy.ServeHTTP(w, r)
	default:
		f.proxy.ServeHTTP(w, r)
	}
}

// selfSigned writes cert.pem/key.pem for 127.0.0.1 into dir.
func selfSigned(dir string) (string, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	ski := sha256.Sum256(elliptic.Marshal(key.Curve, key.X, key.Y))
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "standby-vcsim"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(10 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, SubjectKeyId: ski[:20], AuthorityKeyId: ski[:20],
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", err
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	certFile, keyFile := filepath.Join(dir, "vcsim-cert.pem"), filepath.Join(dir, "vcsim-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", "", err
	}
	return certFile, keyFile, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "front address (TLS)")
	dir := flag.String("dir", "", "directory holding the datastore (required)")
	vms := flag.Int("vms", 2, "number of VMs")
	certFile := flag.String("cert", "", "TLS certificate (PEM)")
	keyFile := flag.String("key", "", "TLS key (PEM)")
	diskMB := flag.Int64("disk-mb", 64, "capacity of each VM's disk in MiB")
	pageAreas := flag.Int("page-areas", 2000, "max changedArea entries per QueryChangedDiskAreas answer")
	pageBytes := flag.Int64("page-bytes", 1<<30, "max disk range covered by one QueryChangedDiskAreas answer")
	flag.Parse()
	if *dir == "" {
		log.Fatal("-dir is required")
	}
	abs, err := filepath.Abs(*dir)
	if err == nil {
		err = os.MkdirAll(abs, 0o755)
	}
	if err != nil {
		log.Fatal(err)
	}
	if *certFile == "" || *keyFile == "" {
		if *certFile, *keyFile, err = selfSigned(abs); err != nil {
			log.Fatal(err)
		}
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	pool := x509.NewCertPool()
	pool.AddCert(leaf)

	// The model creates its datastore with ioutil.TempDir(""), so TMPDIR places it in -dir.
	oldTmp := os.Getenv("TMPDIR")
	_ = os.Setenv("TMPDIR", abs)
	model := simulator.VPX()
	model.Host, model.Machine = 0, *vms
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	_ = os.Setenv("TMPDIR", oldTmp)
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(user, pass)}
	server := model.Service.NewServer()
	backend := &url.URL{Scheme: "https", Host: server.URL.Host}

	f := &front{disks: map[string]*diskState{}, snaps: map[string]map[int32]snapRec{}, cbt: map[string]bool{},
		backend: backend, pageAreas: *pageAreas, pageBytes: *pageBytes, diskBytes: *diskMB << 20, stop: make(chan struct{})}
	f.client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	f.proxy = httputil.NewSingleHostReverseProxy(backend)
	f.proxy.Transport = f.client.Transport
	dsName, dsDir := "", ""
	for _, e := range simulator.Map.All("VirtualMachine") {
		renumberDisks(e.(*simulator.VirtualMachine))
		f.mu.Lock()
		f.syncVM(e.(*simulator.VirtualMachine))
		f.mu.Unlock()
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		dsName, dsDir = ds.Name, ds.Info.GetDatastoreInfo().Url
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	simulator.Map.SessionManager().ServiceHostName = fmt.Sprintf("127.0.0.1:%d", port)
	srv := &http.Server{Handler: f, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = srv.ServeTLS(ln, "", "") }()

	sum := sha256.Sum256(cert.Certificate[0])
	hexes := make([]string, len(sum))
	for i, b := range sum {
		hexes[i] = fmt.Sprintf("%02X", b)
	}
	certAbs, _ := filepath.Abs(*certFile)
	ready, _ := json.Marshal(map[string]interface{}{
		"url": fmt.Sprintf("https://127.0.0.1:%d/sdk", port), "port": port, "cert": certAbs,
		"thumbprint": strings.Join(hexes, ":"), "user": user, "password": pass, "datacenter": "DC0",
		"datastore": dsName, "dir": abs, "datastoreDir": dsDir,
	})
	fmt.Println(string(ready))
	_ = os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case <-f.stop:
		time.Sleep(100 * time.Millisecond)
	}
	_ = srv.Close()
	server.Close()
}
