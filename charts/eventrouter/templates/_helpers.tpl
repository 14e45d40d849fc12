{{/* Names, labels and the checks that refuse unsafe value combinations. */}}

{{- define "eventrouter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eventrouter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "eventrouter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eventrouter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eventrouter.labels" -}}
helm.sh/chart: {{ include "eventrouter.chart" . }}
{{ include "eventrouter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: router
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "eventrouter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "eventrouter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.leaseName" -}}
{{- default (include "eventrouter.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "eventrouter.checkpointConfigMapName" -}}
{{- default (printf "%s-checkpoint" (include "eventrouter.fullname" .)) .Values.checkpoint.configMapName -}}
{{- end -}}

{{- define "eventrouter.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret -}}
{{- .Values.credentials.existingSecret -}}
{{- else if .Values.credentials.values -}}
{{- printf "%s-credentials" (include "eventrouter.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* On what the pod's last checkpoint write needs (the ServiceAccount, the checkpoint Role and
RoleBinding): `helm uninstall` deletes the Deployment and then, without waiting for the pod's drain,
the RBAC and the ServiceAccount. The write at the drain's end was refused (403), and a reinstall sent
again what the drain had delivered. Kept, a reinstall of the release adopts them (Helm >= 3.2); the
chart README says how to remove them for good. */}}
{{- define "eventrouter.keptForTheLastWrite" -}}
helm.sh/resource-policy: keep
{{- end -}}

{{- define "eventrouter.usesDataDir" -}}
{{- if eq .Values.checkpoint.mode "dataDir" -}}true{{- end -}}
{{- end -}}

{{/* "true" when each replica gets a claim of its own (persistence.perReplica): a StatefulSet with
volumeClaimTemplates, whose pod of an ordinal mounts that ordinal's claim again when it is replaced. */}}
{{- define "eventrouter.perReplica" -}}
{{- if and .Values.persistence.enabled .Values.persistence.perReplica -}}true{{- end -}}
{{- end -}}

{{- define "eventrouter.workloadKind" -}}
{{- if include "eventrouter.perReplica" . -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}

{{/* The release's workload (the kind rendered now) as the cluster has it before this install or
upgrade, as YAML: "" on a first install and under `helm template` (no cluster to ask; the chart
README says what to do by hand there). Under another name when this upgrade renames it
(fullnameOverride, nameOverride): the release's router that the upgrade deletes, whose checkpoint
ConfigMap and claim were named after it. Asked once a render (kept in the root context): each of its
5 callers asked the API server again. */}}
{{- define "eventrouter.liveWorkload" -}}
{{- if not (hasKey $ "eventrouterLiveWorkload") -}}
{{- $live := lookup "apps/v1" (include "eventrouter.workloadKind" .) .Release.Namespace (include "eventrouter.fullname" .) -}}
{{- if not $live -}}
{{- range $item := (include "eventrouter.releaseWorkloads" . | fromYaml).items | default list -}}
{{- if and (not $live) (include "eventrouter.isThisRouter" (list $ $item)) -}}{{- $live = $item -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $ "eventrouterLiveWorkload" (ternary (toYaml $live) "" (not (empty $live))) -}}
{{- end -}}
{{- get $ "eventrouterLiveWorkload" -}}
{{- end -}}

{{/* [root, workload]: "true" when the workload is this release's router of this chart: its instance
label and release-name annotation are this release's, and its helm.sh/chart label is this chart's
name followed by a SemVer version. Not a prefix of it: an umbrella release holding the chart twice
(eventrouter, and aliased eventrouter-audit, whose label is eventrouter-audit-0.1.0) had the sibling
taken for this router under a former name, and NOTES told the user to delete its checkpoint. */}}
{{- define "eventrouter.isThisRouter" -}}
{{- $root := index . 0 -}}
{{- $item := index . 1 -}}
{{- $labels := dig "metadata" "labels" dict $item -}}
{{- $chart := printf `^%s-v?[0-9]+\.[0-9]+\.[0-9]+([-_][0-9A-Za-z._-]*)?$` (regexQuoteMeta $root.Chart.Name) -}}
{{- if and (eq (toString (get $labels "app.kubernetes.io/instance")) $root.Release.Name) (eq (toString (get $labels "app.kubernetes.io/component")) "router") (regexMatch $chart (toString (get $labels "helm.sh/chart"))) (eq (dig "metadata" "annotations" "meta.helm.sh/release-name" "" $item) $root.Release.Name) -}}true{{- end -}}
{{- end -}}

{{/* The workloads of the kind rendered now in the release namespace that a rename may have left, as
YAML ({items: [...]}; {} without a cluster). None on a first install, which has no former router:
the list needs `list` on deployments (statefulsets) of whoever runs helm, which `helm install` does
not otherwise need (a 403 failed the render). */}}
{{- define "eventrouter.releaseWorkloads" -}}
{{- if .Release.IsUpgrade -}}{{- include "eventrouter.listWorkloads" . -}}{{- end -}}
{{- end -}}

{{- define "eventrouter.listWorkloads" -}}
{{- toYaml (lookup "apps/v1" (include "eventrouter.workloadKind" .) .Release.Namespace "") -}}
{{- end -}}

{{/* The live router container's args, as JSON ([] without a live workload). */}}
{{- define "eventrouter.liveArgs" -}}
{{- $live := include "eventrouter.liveWorkload" . | fromYaml -}}
{{- $args := list -}}
{{- range $c := (dig "spec" "template" "spec" "containers" list $live) -}}
{{- if eq (toString $c.name) "eventrouter" -}}{{- $args = $c.args | default list -}}{{- end -}}
{{- end -}}
{{- toJson $args -}}
{{- end -}}

{{/* "true" when this upgrade turns leader election on: the running router has no --leader-elect. It
holds no Lease and delivers until it stops, so a surged new pod (which finds the Lease free and leads)
delivered every occurrence of the rollout a second time. */}}
{{- define "eventrouter.turnsLeaderElectionOn" -}}
{{- $args := include "eventrouter.liveArgs" . | fromJsonArray -}}
{{- if and .Values.leaderElection.enabled $args (not (has "--leader-elect" $args)) -}}true{{- end -}}
{{- end -}}

{{/* The checkpoint mode of the running router, from its args: configMap, dataDir, none, or "" (none runs). */}}
{{- define "eventrouter.liveCheckpointMode" -}}
{{- $args := include "eventrouter.liveArgs" . | fromJsonArray -}}
{{- $mode := "" -}}
{{- if $args -}}
{{- $mode = "none" -}}
{{- range $arg := $args -}}
{{- if hasPrefix "--checkpoint-configmap=" (toString $arg) -}}{{- $mode = "configMap" -}}
{{- else if and (hasPrefix "--data-dir=" (toString $arg)) (eq $mode "none") -}}{{- $mode = "dataDir" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* The ConfigMap the running router keeps its checkpoint in (its --checkpoint-configmap), "" for none. */}}
{{- define "eventrouter.liveCheckpointConfigMap" -}}
{{- range $arg := (include "eventrouter.liveArgs" . | fromJsonArray) -}}
{{- if hasPrefix "--checkpoint-configmap=" (toString $arg) -}}{{- trimPrefix "--checkpoint-configmap=" (toString $arg) -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The claim the running router's data dir is on ("" for an emptyDir or none). */}}
{{- define "eventrouter.liveDataClaim" -}}
{{- $live := include "eventrouter.liveWorkload" . | fromYaml -}}
{{- range $v := (dig "spec" "template" "spec" "volumes" list $live) -}}
{{- if and (eq (toString $v.name) "data") $v.persistentVolumeClaim -}}{{- $v.persistentVolumeClaim.claimName -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Refuse a credential written as a literal: option keys that name a secret must hold an
`env:NAME` or `file:/path` reference, so no secret ends up in the ConfigMap or the pod's args.
The names are those of files/credential-options.txt (every credential option of the built-in
sinks, kept equal to their options models by a test) and whatever this pattern matches (others').
*/}}
{{- define "eventrouter.secretKeyPattern" -}}(?i)(password|passwd|token|secret|api_?key|access_?key|access_?key_?id|private_?key|^key|^sign|corpsecret|^headers?|^proxy)${{- end -}}

{{/* Environment variable names that hold a credential: the last word of the name in any case or
style (LOKI_PASSWORD, DINGTALK_TOKEN, kube-eventer's AccessKeySecret, clientSecret, AWS_ACCESS_KEY_ID),
not a word inside it (SSL_KEY_FILE, TOKEN_URL, GOOGLE_APPLICATION_CREDENTIALS: a path). The long
words need no boundary; the short `pass`/`key` need `_`, `-`, `.`, the start or a camelCase capital
(DbPass, SecretKey), so MONKEY and BYPASS render. An access key's id is kept with its secret: it is
refused as an option (accessKeyId) too, and both go in the one Secret. */}}
{{- define "eventrouter.envSecretPattern" -}}(?i:password|passwd|token|secret|api_?key|access_?key(_?id)?|private_?key)$|(?i:(^|[-._])(pass|key))$|[a-z0-9](Pass|Key)${{- end -}}

{{- define "eventrouter.credentialHint" -}}give it as env:VAR_NAME or file:/path and put the value in credentials.values or credentials.existingSecret{{- end -}}

{{/* An option key as messages show it, as the router's config._shown_option: a credential typed
Name:Value (`?password:S3cret`, a YAML flow `{password:S3cret}`) makes a key *named*
`password:S3cret`, and Helm's output (CI logs, Argo CD's sync error) printed it whole. Only its part
before the first `:`, `=` or white space (Python's, the router's) is shown; a key with an @ (a piece
of a URL's user info), or whose part before the cut is no option's name, not at all. Given [key,
pattern], the part before the cut must match the pattern (a Kubernetes key's holds a '/'). */}}
{{- define "eventrouter.shownKey" -}}
{{- $key := . -}}
{{- $headPattern := `^[A-Za-z0-9_.-]+$` -}}
{{- if kindIs "slice" . -}}{{- $key = index . 0 -}}{{- $headPattern = index . 1 -}}{{- end -}}
{{- $key = toString $key -}}
{{- $cutAt := `[:=\t-\r\x{1c}-\x{20}\x{85}\p{Z}]` -}}
{{- if contains "@" $key -}}(a name holding an @, not shown)
{{- else if not (regexMatch $cutAt $key) -}}{{- printf "%q" $key -}}
{{- else -}}
{{- $head := regexReplaceAll (printf `(?s)%s.*$` $cutAt) $key "" -}}
{{- if regexMatch $headPattern $head -}}
{{- printf "%q (the rest not shown: did you mean %s=…?)" (print $head (regexFind $cutAt $key) "…") $head -}}
{{- else -}}(a name that is no option's, not shown){{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when the text holds a URL's user info (scheme://user:password@host), also when a raw `?`
in the password cut the address short as the router reads it (it then takes the rest as a query). */}}
{{- define "eventrouter.hasUserInfo" -}}
{{- $text := toString . -}}
{{- $before := index (splitn "?" 2 $text) "_0" -}}
{{- if regexMatch `[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*@` $before -}}true
{{- else if and (contains "?" $text) (contains "://" $before) (contains "@" (index (splitn "?" 2 $text) "_1")) -}}
{{- $address := regexReplaceAll `[/#].*$` (regexReplaceAll `^.*://` $before "") "" -}}
{{- if not (regexMatch `^(\[[0-9A-Fa-f:.]*\]|[A-Za-z0-9._~-]*)(:[0-9]*)?$` $address) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The characters a query value is percent-decoded from by the router that make a URL's user info. */}}
{{- define "eventrouter.decodeUrlChars" -}}
{{- toString . | replace "%3A" ":" | replace "%3a" ":" | replace "%2F" "/" | replace "%2f" "/" | replace "%40" "@" | replace "%3F" "?" | replace "%3f" "?" -}}
{{- end -}}

{{/* [where, what, text]: refuse user info in a URL. */}}
{{- define "eventrouter.checkUserInfo" -}}
{{- if include "eventrouter.hasUserInfo" (index . 2) -}}
{{- fail (printf "%s: %s holds a URL's user info (scheme://user:password@host), which would be readable in the pod spec or the ConfigMap; give the user and password as options (username=, password=file:/path or env:VAR_NAME) and put the value in credentials.values or credentials.existingSecret" (index . 0) (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* A sink's name (or type) as messages show it, unquoted; "" when it may hold a credential. Item
320's rule for a text a pattern's error may show: a name's characters and spaces, 12 at most, or 32
without a digit (`loki-production`). A long token, `token:S3cret` or a URL is never shown. */}}
{{- define "eventrouter.shownName" -}}
{{- $text := toString . -}}
{{- if regexMatch `^([A-Za-z0-9_. -]{1,12}|[A-Za-z_. -]{1,32})$` $text -}}{{- $text -}}{{- end -}}
{{- end -}}

{{/* [where, what, name]: refuse a sink's name holding a ':', '=' or '@' (also percent-encoded, as the
router decodes a query's): the shape of a credential typed name:value, a flag ported whole or a URL's
user info; the ConfigMap and the pod spec would hold it. Also a '/', a control character or more than
200 characters (a %XX counted as the character it decodes to): the router's own rule (item 339), which
refuses each at start (exit 2). Not shown. */}}
{{- define "eventrouter.checkNameText" -}}
{{- $text := toString (index . 2) -}}
{{- if regexMatch `(?i)[:=@]|%3a|%3d|%40` $text -}}
{{- fail (printf "%s: %s holds a ':', '=' or '@' (as a credential typed name:value, a flag pasted whole or a URL's user info does), which the router would print in its logs and metric labels; name the sink with letters, digits, '_', '.', '-'; the name is not shown, as it may hold a credential" (index . 0) (index . 1)) -}}
{{- else if regexMatch `(?i)/|%2f` $text -}}
{{- fail (printf "%s: %s holds a '/', which the router refuses at start (exit 2): a sink's name names its files in the data dir; name the sink with letters, digits, '_', '.', '-'; the name is not shown, as it may hold a credential" (index . 0) (index . 1)) -}}
{{- else if regexMatch `(?i)[\x00-\x1f\x7f-\x9f]|%[01][0-9a-f]|%7f|%c2%[89][0-9a-f]` $text -}}
{{- fail (printf "%s: %s holds a control character (also percent-encoded), which the router refuses at start (exit 2); name the sink with letters, digits, '_', '.', '-'; the name is not shown, as it may hold a credential" (index . 0) (index . 1)) -}}
{{- else if gt (len (regexFindAll `(?s).` (regexReplaceAll `(?i)%[0-9a-f]{2}` (regexReplaceAll `(?i)%[89ab][0-9a-f]` $text "") "x") -1)) 200 -}}
{{- fail (printf "%s: %s is longer than 200 characters, which the router refuses at start (exit 2): it names the sink's files in the data dir; the name is not shown, as it may hold a credential" (index . 0) (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* [where, query]: each name= of a flag's (or a config url's) query, which names the sink. */}}
{{- define "eventrouter.checkQueryName" -}}
{{- $where := index . 0 -}}
{{- range $pair := splitList "&" (index . 1) -}}
{{- $kv := splitn "=" 2 $pair -}}
{{- if eq $kv._0 "name" -}}
{{- include "eventrouter.checkNameText" (list $where "the sink's name=" ($kv._1 | default "")) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, key, value, credential option names]: a credential option's value, as a scalar, a list
(each item) or a map (each value, as YAML headers are written), must be an env:/file: reference. A
header given as Name:Value may reference its value only (the webhook sink resolves it per header);
a proxy may be a plain http(s)://host:port without user info. */}}
{{- define "eventrouter.checkSecretValue" -}}
{{- $where := index . 0 -}}
{{- $key := toString (index . 1) -}}
{{- $value := index . 2 -}}
{{- $name := lower $key -}}
{{- $isHeader := has $name (list "header" "headers") -}}
{{- if or (regexMatch (include "eventrouter.secretKeyPattern" dict) $key) (has $name (index . 3)) -}}
{{- if kindIs "map" $value -}}
{{- range $header, $item := $value -}}
{{- if not (regexMatch "^(env:|file:)" (toString $item)) -}}
{{- if and $isHeader (regexMatch `[:=\s]` (toString $header)) -}}
{{- /* A YAML flow {Authorization:Bearer TOKEN} is one key holding the credential: never printed. */ -}}
{{- fail (printf "%s: header key %q… is not a header name (the rest not shown; in YAML, Name: Value has a space after the colon); give the value as env:VAR_NAME or file:/path (headers carry credentials)" $where (regexReplaceAll `(?s)[:=\s].*$` (toString $header) "")) -}}
{{- else if $isHeader -}}
{{- fail (printf "%s: header %q holds a literal value; give it as env:VAR_NAME or file:/path (headers carry credentials)" $where (toString $header)) -}}
{{- else -}}
{{- fail (printf "%s: option %s looks like a credential; %s" $where (include "eventrouter.shownKey" $key) (include "eventrouter.credentialHint" dict)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- $items := list $value -}}
{{- if kindIs "slice" $value -}}{{- $items = $value -}}{{- end -}}
{{- range $n, $item := $items -}}
{{- $text := toString $item -}}
{{- if and (ne $text "") (ne $text "<nil>") (not (regexMatch "^(env:|file:)" $text)) -}}
{{- if $isHeader -}}
{{- $headerValue := regexReplaceAll `^[^:=]*[:=]` $text "" -}}
{{- if or (not (regexMatch `^[^:=]+[:=]` $text)) (not (regexMatch `^\s*(env:|file:)` $headerValue)) -}}
{{- fail (printf "%s: option %s, item %d: a header's value is a literal; write Name:env:VAR_NAME or Name:file:/path (the webhook sink), or the whole Name:Value as env:VAR_NAME or file:/path (Loki), and put the value in credentials.values or credentials.existingSecret (headers carry credentials)" $where (include "eventrouter.shownKey" $key) (add1 $n)) -}}
{{- end -}}
{{- else if and (eq $name "proxy") (regexMatch `^(?i)https?://[A-Za-z0-9.:\[\]_-]+/?$` $text) -}}
{{- /* A proxy's address alone is no secret; user info in it is refused as in any URL. */ -}}
{{- else -}}
{{- fail (printf "%s: option %s looks like a credential; %s" $where (include "eventrouter.shownKey" $key) (include "eventrouter.credentialHint" dict)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, query, credential option names]: each key=value of a URL's query. */}}
{{- define "eventrouter.checkQuery" -}}
{{- $where := index . 0 -}}
{{- $names := index . 2 -}}
{{- range $pair := splitList "&" (index . 1) -}}
{{- $kv := splitn "=" 2 $pair -}}
{{- $key := $kv._0 -}}
{{- /* The router percent-decodes keys (pass%77ord is password) and takes + as a space: a key written
       so would pass a check of its name. No option's name holds them, nor an @ (user info). */ -}}
{{- if regexMatch `[%+@]` $key -}}
{{- fail (printf "%s: a query key holds %%, + or @ (percent-encoded, or part of a URL's user info); write option names as plain text so that credentials can be checked" $where) -}}
{{- end -}}
{{- if contains "=" $pair -}}
{{- include "eventrouter.checkSecretValue" (list $where $key $kv._1 $names) -}}
{{- include "eventrouter.checkUserInfo" (list $where (printf "option %s" (include "eventrouter.shownKey" $key)) (include "eventrouter.decodeUrlChars" $kv._1)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, TYPE:URL?query flag, credential option names, built-in types]. */}}
{{- define "eventrouter.checkFlag" -}}
{{- $where := index . 0 -}}
{{- $flag := toString (index . 1) -}}
{{- /* The ConfigMap's sink-flags holds one flag a line. */ -}}
{{- if regexMatch `[\r\n]` $flag -}}
{{- fail (printf "%s: a sink flag holds a line break; write it on one line" $where) -}}
{{- end -}}
{{- /* TYPE, or TYPE:URL?query: the router strips the type and takes `stdout` alone. Not quoted (the
       schema's pattern printed the whole flag, a literal credential in its query too). */ -}}
{{- if not (regexMatch `^[A-Za-z0-9_.-]+$` (trim (index (splitn ":" 2 $flag) "_0"))) -}}
{{- fail (printf "%s: a sink flag is TYPE or TYPE:URL?options, and what precedes its first ':' is no sink type (letters, digits, '_', '.', '-'); the flag is not shown, as it may hold a credential" $where) -}}
{{- end -}}
{{- include "eventrouter.checkTypeCase" (list $where (trim (index (splitn ":" 2 $flag) "_0")) (index . 3)) -}}
{{- include "eventrouter.checkUserInfo" (list $where "the sink's URL" $flag) -}}
{{- if contains "?" $flag -}}
{{- include "eventrouter.checkQuery" (list $where (index (splitn "?" 2 $flag) "_1") (index . 2)) -}}
{{- include "eventrouter.checkQueryName" (list $where (index (splitn "?" 2 $flag) "_1")) -}}
{{- end -}}
{{- end -}}

{{/* [where, type, built-in types]: the router matches a type exactly, so `Loki` or `STDOUT` was taken
for a plugin's (nothing checked) and the pod exited 2 ("unknown sink type"). A built-in type's name in
another case cannot be a plugin meant: refused, naming the spelling (a type's name is no secret). */}}
{{- define "eventrouter.checkTypeCase" -}}
{{- $type := toString (index . 1) -}}
{{- if and (not (has $type (index . 2))) (has (lower $type) (index . 2)) -}}
{{- fail (printf "%s: sink type %q is no type (the router matches types exactly, and would refuse it at start, exit 2): did you mean %s?" (index . 0) $type (lower $type)) -}}
{{- end -}}
{{- end -}}

{{/* sinks.flags as JSON, [] when a values file left `sinks:` or `flags:` blank (YAML null: Helm then
drops the default), which the router takes as no flags: NOTES failed on it ("len of nil pointer"). */}}
{{- define "eventrouter.flags" -}}
{{- toJson (dig "flags" list (.Values.sinks | default dict) | default list) -}}
{{- end -}}

{{/* The --sink values the pod gets as args (sinks.flags, then each --sink of extraArgs), one a line:
the ConfigMap's sink-flags. The router's config.yaml lacks them, so a dead-letter replay in the pod
given --config alone had the letters of such a sink "not configured here": they went to stdout, exit
0, and the documented loop removed the file. `eventrouter replay --sink-flags` reads this. */}}
{{- define "eventrouter.sinkFlags" -}}
{{- $flags := list -}}
{{- range $found := (include "eventrouter.sinkFlagsWhere" . | fromJsonArray) -}}
{{- $flags = append $flags (index $found 1) -}}
{{- end -}}
{{- join "\n" $flags -}}
{{- end -}}

{{/* The sink name of a TYPE:URL?query flag (or of a config.sinks entry's type and url), as the router
reads it: its name= option (a + read as a space), else its type; "" when the chart cannot tell: a key
or the name holding a %, which the router percent-decodes (na%6De= is name=) and Helm cannot. */}}
{{- define "eventrouter.flagName" -}}
{{- $flag := toString . -}}
{{- $type := trim (index (splitn ":" 2 $flag) "_0") -}}
{{- $name := "" -}}
{{- $known := true -}}
{{- if contains "?" $flag -}}
{{- range $pair := splitList "&" (index (splitn "?" 2 $flag) "_1") -}}
{{- $kv := splitn "=" 2 $pair -}}
{{- if contains "%" $kv._0 -}}{{- $known = false -}}
{{- else if and (eq $kv._0 "name") (not $name) -}}
{{- $name = replace "+" " " ($kv._1 | default "") -}}
{{- if contains "%" $name -}}{{- $known = false -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $known -}}{{- default $type $name -}}{{- end -}}
{{- end -}}

{{/* The sink name of a config.sinks entry, as the router reads it: its name:, else a name= in its url's
query (the router takes a url's query as a flag's, name included), else its type; "" when the chart
cannot tell (see flagName; a name that is no string, which the schema refuses). */}}
{{- define "eventrouter.configSinkName" -}}
{{- if kindIs "string" .type -}}
{{- if hasKey . "name" -}}
{{- if or (kindIs "string" .name) (kindIs "invalid" .name) -}}{{- default .type .name -}}{{- end -}}
{{- else if and (kindIs "string" .url) (contains "?" .url) -}}
{{- include "eventrouter.flagName" (printf "%s:%s" .type .url) -}}
{{- else -}}
{{- .type -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, flag] of each --sink the pod gets: sinks.flags, then each --sink of extraArgs. */}}
{{- define "eventrouter.sinkFlagsWhere" -}}
{{- $found := list -}}
{{- range $i, $flag := (include "eventrouter.flags" . | fromJsonArray) -}}
{{- $found = append $found (list (printf "sinks.flags[%d]" $i) (toString $flag)) -}}
{{- end -}}
{{- $args := .Values.extraArgs | default list -}}
{{- range $i, $arg := $args -}}
{{- $arg = toString $arg -}}
{{- if regexMatch `^--si(n|nk)?=` $arg -}}
{{- $found = append $found (list (printf "extraArgs[%d]" $i) (regexReplaceAll `^--si(n|nk)?=` $arg "")) -}}
{{- else if and (regexMatch `^--si(n|nk)?$` $arg) (lt (add1 $i) (len $args)) -}}
{{- $found = append $found (list (printf "extraArgs[%d]" (add1 $i)) (toString (index $args (add1 $i)))) -}}
{{- end -}}
{{- end -}}
{{- toJson $found -}}
{{- end -}}

{{/* [where, TYPE:URL?query flag, {type: {key: constraint}}, {type: [one-value keys]}, [types whose
unknown query keys stay in the URL]]: each query key must be an option of the flag's type, given once
if it takes one value, and its value within the option's enum and bounds, a number's in a form the
router reads (files/sink-options.json, one-value-options.json and url-query-passthrough.json, generated
by scripts/gen_docs.py from the sinks' option models, as the schema's config.sinks): the router refuses
anything else at start (exit 2). The webhook's unknown keys stay in its URL, but the keys that are
its options are judged as any sink's (they were not: `batch_max_events=0` rendered a pod that exits 2).
A type not in the files (a plugin's) is not checked; nor is a value holding a % (the router decodes
it). */}}
{{- define "eventrouter.checkFlagKeys" -}}
{{- $where := index . 0 -}}
{{- $flag := toString (index . 1) -}}
{{- $type := trim (index (splitn ":" 2 $flag) "_0") -}}
{{- $known := get (index . 2) $type -}}
{{- $oneValue := get (index . 3) $type -}}
{{- $builtIn := hasKey (index . 3) $type -}}
{{- $passthrough := has $type (index . 4) -}}
{{- $given := dict -}}
{{- if contains "?" $flag -}}
{{- range $pair := splitList "&" (index (splitn "?" 2 $flag) "_1") -}}
{{- $kv := splitn "=" 2 $pair -}}
{{- $key := $kv._0 -}}
{{- /* A key holding a % is the router's to decode (na%6De= is name=), which Helm cannot: a flag's is
       refused before (checkQuery), a config url's left to the router. */ -}}
{{- if not (contains "%" $key) -}}
{{- /* A plugin's too (not in the files): the key rendered into the pod spec or the ConfigMap. */ -}}
{{- if and $pair (regexMatch `[:=\t-\r\x{1c}-\x{20}\x{85}\p{Z}]` $key) -}}
{{- fail (printf "%s (%s sink): query key %s holds a ':' or white space, as a credential typed name:value does; write name=value (%s)" $where $type (include "eventrouter.shownKey" $key) (ternary "the router would refuse it at start, exit 2" "it would be rendered into the pod spec or the ConfigMap as written" $builtIn)) -}}
{{- end -}}
{{- if and $known $pair (not (hasKey $known $key)) (not $passthrough) -}}
{{- fail (printf "%s (%s sink): option %s is not one the %s sink takes (its options, the filter and pipeline options: docs/sinks.md, or `eventrouter sinks`); the router would refuse it at start (exit 2)" $where $type (include "eventrouter.shownKey" $key) $type) -}}
{{- end -}}
{{- /* `stream=stderr&stream=stdout`, `level=Warning&level=Normal`: the router refuses an option of one
       value given twice (which one was meant is not known). */ -}}
{{- if and $pair (has $key ($oneValue | default list)) (hasKey $given $key) -}}
{{- fail (printf "%s (%s sink): option %q is given twice, but takes one value; the router would refuse it at start (exit 2)" $where $type $key) -}}
{{- end -}}
{{- $_ := set $given $key true -}}
{{- $rule := dict -}}
{{- if $known -}}{{- $rule = get $known $key | default dict -}}{{- end -}}
{{- $value := $kv._1 | default "" -}}
{{- if and $rule (contains "=" $pair) (not (contains "%" $value)) -}}
{{- include "eventrouter.checkFlagValue" (list $where (printf "%s sink" $type) $key $value $rule) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, what, key, value, {enum, pattern, minimum, maximum, exclusiveMinimum, exclusiveMaximum,
number}]: a flag's value is text, in which the router reads a + as a space. */}}
{{- define "eventrouter.checkFlagValue" -}}
{{- $value := index . 3 -}}
{{- $rule := index . 4 -}}
{{- $wrong := "" -}}
{{- $pattern := include "eventrouter.rulePattern" $rule -}}
{{- if and (hasKey $rule "enum") (not (has $value $rule.enum)) -}}
{{- $wrong = printf "one of %s" (join ", " (without $rule.enum nil)) -}}
{{- else if and $pattern (not (regexMatch $pattern $value)) -}}
{{- $wrong = printf "a value matching %s" $pattern -}}
{{- else if hasKey $rule "number" -}}
{{- $wrong = include "eventrouter.numberWrong" (list (replace "+" " " $value) $rule) -}}
{{- end -}}
{{- if $wrong -}}
{{- fail (printf "%s (%s): option %q %s, must be %s; the router would refuse it at start (exit 2)" (index . 0) (index . 1) (index . 2) (include "eventrouter.shownValue" (list (index . 2) $value (hasKey $rule "number"))) $wrong) -}}
{{- end -}}
{{- end -}}

{{/* The pattern of a rule of files/sink-options.json ("" for none): the schema's, which applies it in its
`else` to a text its error may show only (scripts/gen_docs.py's _unquoting); the templates to any. */}}
{{- define "eventrouter.rulePattern" -}}
{{- dig "else" "pattern" (get . "pattern") . -}}
{{- end -}}

{{/* [key, value, number?]: how a refused value is shown. Whole only when it holds a number's or a
name's characters and spaces, 32 at most for a number option (a typo: `5s`), 12 for another (`Warnin`),
and the option is no credential's neighbour (a key naming a token, secret, password, signature, key,
auth or credential: `signature=<the HMAC key>`); else not at all, as the router shows none.
`?batch_max_events=5;password=S` (`;` as the old query separator, on which Python no longer splits) is
one value `5;password=S` to the router, and the refusal printed it, password and all. */}}
{{- define "eventrouter.shownValue" -}}
{{- $key := toString (index . 0) -}}
{{- $value := toString (index . 1) -}}
{{- $most := ternary 32 12 (index . 2) -}}
{{- if and (not (regexMatch `(?i)token|secret|passw|sign|key|auth|credential` $key)) (regexMatch (printf `^[A-Za-z0-9_.+\t -]{0,%d}$` $most) $value) -}}is {{ printf "%q" $value }}
{{- else -}}
has a value not shown (it may hold a credential: shown only when short, of a number's or a name's characters, and of an option that is no credential's{{ if regexMatch `;[^=&]*=` $value }}; a ';' is no query separator to the router: use '&'{{ end }})
{{- end -}}
{{- end -}}

{{/* [text, rule]: "" when the router's pydantic (lax mode) reads the text as a number its rule takes,
else what it must be. An integer: white space around, a sign, digits with single `_`
between them, a `.0…` (not 1e3, 5.5, 0x10). A float: also 5., .5, exponents, inf and nan where the
rule's kind (number: float, not finite) and bounds allow; `_` (no two together, none first or last)
only without white space. */}}
{{- define "eventrouter.numberWrong" -}}
{{- $text := index . 0 -}}
{{- $rule := index . 1 -}}
{{- $space := `[\t-\r\x{85}\p{Z}]` -}}{{- /* Unicode's White_Space, as pydantic-core (Rust) strips */ -}}
{{- $trimmed := regexReplaceAll (printf `^%s+|%s+$` $space $space) $text "" -}}
{{- $float := `^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$` -}}
{{- $special := `^[-+]?(?i:inf|infinity|nan)$` -}}
{{- $number := "" -}}
{{- if eq $rule.number "integer" -}}
{{- if regexMatch `^[-+]?[0-9](_?[0-9])*(\.0+)?$` $trimmed -}}{{- $number = replace "_" "" $trimmed -}}{{- end -}}
{{- else if or (regexMatch $float $trimmed) (regexMatch $special $trimmed) -}}
{{- $number = $trimmed -}}
{{- else if and (contains "_" $text) (not (regexMatch `^_|_$|__` $text)) -}}
{{- $plain := replace "_" "" $text -}}
{{- if or (regexMatch $float $plain) (regexMatch $special $plain) -}}{{- $number = $plain -}}{{- end -}}
{{- end -}}
{{- $bounded := or (hasKey $rule "minimum") (hasKey $rule "maximum") (hasKey $rule "exclusiveMinimum") (hasKey $rule "exclusiveMaximum") -}}
{{- $infinite := regexMatch `(?i)inf` $number -}}
{{- $n := 0.0 -}}
{{- if $number -}}
{{- $n = float64 $number -}}
{{- /* sprig's float64 is 0 for what overflows (1e400): the router reads inf. */ -}}
{{- if and (eq $n 0.0) (regexMatch `^[-+]?[0-9.]*[1-9][0-9.]*[eE]\+?[0-9]` $number) -}}
{{- $infinite = true -}}
{{- $n = float64 (printf "%sinf" (ternary "-" "" (hasPrefix "-" $number))) -}}
{{- end -}}
{{- end -}}
{{- if not $number -}}
{{- ternary "an integer (digits, _ between two of them)" "a number" (eq $rule.number "integer") -}}
{{- else if and (eq $rule.number "finite") (or $infinite (regexMatch `(?i)nan` $number)) -}}
a finite number
{{- else if and $bounded (regexMatch `(?i)nan` $number) -}}
a number, not nan
{{- else if and (hasKey $rule "minimum") (lt $n (float64 $rule.minimum)) -}}at least {{ $rule.minimum }}
{{- else if and (hasKey $rule "exclusiveMinimum") (le $n (float64 $rule.exclusiveMinimum)) -}}more than {{ $rule.exclusiveMinimum }}
{{- else if and (hasKey $rule "maximum") (gt $n (float64 $rule.maximum)) -}}at most {{ $rule.maximum }}
{{- else if and (hasKey $rule "exclusiveMaximum") (ge $n (float64 $rule.exclusiveMaximum)) -}}less than {{ $rule.exclusiveMaximum }}
{{- end -}}
{{- end -}}

{{/* Two sinks of one name (configSinkName, flagName), or of names stored as one file name in the data
dir: the router refuses them at start (exit 2), and with Recreate the working pod was already gone.
Checked in the router's order: config.sinks, then the flags. A name the chart cannot tell ("") is left
to the router: better a clash refused at start than a refusal of names the router takes. */}}
{{- define "eventrouter.checkSinkNames" -}}
{{- $seen := dict -}}
{{- $sinks := list -}}
{{- range $i, $sink := (.Values.config.sinks | default list) -}}
{{- if kindIs "map" $sink -}}
{{- $sinks = append $sinks (list (printf "config.sinks[%d]" $i) (include "eventrouter.configSinkName" $sink)) -}}
{{- end -}}
{{- end -}}
{{- range $found := (include "eventrouter.sinkFlagsWhere" . | fromJsonArray) -}}
{{- $sinks = append $sinks (list (index $found 0) (include "eventrouter.flagName" (index $found 1))) -}}
{{- end -}}
{{- range $sink := $sinks -}}
{{- $where := index $sink 0 -}}
{{- $name := index $sink 1 -}}
{{- if $name -}}
{{- $file := regexReplaceAll `[^A-Za-z0-9_.-]` $name "_" | default "_" -}}
{{- with (get $seen $file) -}}
{{- /* Each name shown only when safe to show (shownName): a long token given as both names was printed. */ -}}
{{- $shown := and (include "eventrouter.shownName" $name) (include "eventrouter.shownName" (index . 1)) -}}
{{- $distinct := "give each a distinct name (name= in a flag, name: or its url's name= in config.sinks; without one a sink is named after its type)" -}}
{{- if and (eq (index . 1) $name) $shown -}}
{{- fail (printf "%s (sink %q): sink name %q is already used by %s; the router refuses two sinks of one name at start (exit 2): %s" $where $name $name (index . 0) $distinct) -}}
{{- else if eq (index . 1) $name -}}
{{- fail (printf "%s: its sink name (not shown, as it may hold a credential) is already used by %s; the router refuses two sinks of one name at start (exit 2): %s" $where (index . 0) $distinct) -}}
{{- else if $shown -}}
{{- fail (printf "%s (sink %q): sink names %q and %q (%s) are both stored as %q in the data dir; the router refuses them at start (exit 2): give them names that differ in letters, digits, '_', '.' or '-'" $where $name $name (index . 1) (index . 0) $file) -}}
{{- else -}}
{{- fail (printf "%s: its sink name and that of %s (not shown, as they may hold a credential) are both stored as one file name in the data dir; the router refuses them at start (exit 2): give them names that differ in letters, digits, '_', '.' or '-'" $where (index . 0)) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $seen $file (list $where $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [value name, path, [name, path] of each other mount]: a mount of the values may not be another's
path, nor hold one below it (Kubernetes refuses two mounts at one path only when the Deployment is
applied; one at /etc/eventrouter, the Secret's read-only volume, left no room for the config file's
mount inside it, and the container could not start), nor lie inside the read-only Secret. */}}
{{- define "eventrouter.checkMountPath" -}}
{{- $name := index . 0 -}}
{{- $path := clean (toString (index . 1)) -}}
{{- range $other := index . 2 -}}
{{- $otherName := index $other 0 -}}
{{- $otherPath := clean (toString (index $other 1)) -}}
{{- $inside := printf "%s/" (trimSuffix "/" $path) -}}
{{- if eq $path $otherPath -}}
{{- fail (printf "%s (%s) is also the path of %s: two mounts there collide; choose another folder" $name $path $otherName) -}}
{{- else if hasPrefix $inside $otherPath -}}
{{- fail (printf "%s (%s) holds %s (%s), which the chart mounts too: choose a folder that does not hold it" $name $path $otherName $otherPath) -}}
{{- else if and (eq $otherName "credentials.mountPath") (hasPrefix (printf "%s/" (trimSuffix "/" $otherPath)) $path) -}}
{{- fail (printf "%s (%s) is inside credentials.mountPath (%s), the Secret's read-only volume: choose a folder outside it" $name $path $otherPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, map, what a key must match, what it must be(, what a shown key's head may be)]: a key
holding another character. The schema lets it through (patternProperties): its errors print a key
whole, and a credential typed name:value (`{LOKI_PASSWORD:S3cret}`, a YAML flow without a space) is
one key holding it. Refused here, shown as the router shows an option (shownKey). */}}
{{- define "eventrouter.checkKeys" -}}
{{- $where := index . 0 -}}
{{- $head := `^[A-Za-z0-9_.-]+$` -}}
{{- if gt (len .) 4 -}}{{- $head = index . 4 -}}{{- end -}}
{{- range $key, $_ := (kindIs "map" (index . 1) | ternary (index . 1) dict) -}}
{{- if not (regexMatch (index $ 2) $key) -}}
{{- fail (printf "%s: key %s is not %s (in YAML, name: value has a space after the colon)" $where (include "eventrouter.shownKey" (list $key $head)) (index $ 3)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* [where, value, pattern, what it must be]: a string value the pattern refuses. The schema applies
its pattern only to a value its error may show (short, of a name's characters: the values' `if`
pattern); another may be a credential or a URL holding one pasted there (`leaseName:
http://admin:S3cret@host`), which Helm's error quoted whole. Refused here, not shown. */}}
{{- define "eventrouter.checkPattern" -}}
{{- $value := index . 1 -}}
{{- if and (kindIs "string" $value) (not (regexMatch (index . 2) $value)) -}}
{{- fail (printf "%s is not %s; the value is not shown, as it may hold a credential" (index . 0) (index . 3)) -}}
{{- end -}}
{{- end -}}

{{/* The values.schema.json patterns outside config (config.sinks' are judged with the sink's options),
for the values the schema lets through (see checkPattern). Kept equal to the schema's by a test. */}}
{{- define "eventrouter.checkPatterns" -}}
{{- $v := .Values -}}
{{- $name := `lowercase letters, digits, '-' and '.', first and last a letter or digit` -}}
{{- $checks := list
      (list "image.digest" `^(sha256:[a-f0-9]{64})?$` "a digest (sha256: and 64 lowercase hex digits), or empty")
      (list "credentials.mountPath" `^/` "an absolute path (starting with /)")
      (list "checkpoint.dataDir" `^/` "an absolute path (starting with /)")
      (list "checkpoint.configMapName" `^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$` (printf "a ConfigMap's name (%s), or empty for <fullname>-checkpoint" $name))
      (list "leaderElection.leaseName" `^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$` (printf "a Lease's name (%s), or empty for the release's full name" $name))
      (list "metrics.serviceMonitor.interval" `^[0-9]+(ms|s|m|h)$` "a duration: digits and ms, s, m or h (30s)")
      (list "metrics.serviceMonitor.scrapeTimeout" `^[0-9]+(ms|s|m|h)$` "a duration: digits and ms, s, m or h (10s)")
      (list "podDisruptionBudget.minAvailable" `^[0-9]+%$` "an integer or a percentage (50%)")
      (list "podDisruptionBudget.maxUnavailable" `^[0-9]+%$` "an integer or a percentage (50%)") -}}
{{- range $check := $checks -}}
{{- $at := $v -}}
{{- range $part := splitList "." (index $check 0) -}}
{{- if and (kindIs "map" $at) (hasKey $at $part) -}}{{- $at = get $at $part -}}{{- else -}}{{- $at = dict -}}{{- end -}}
{{- end -}}
{{- include "eventrouter.checkPattern" (list (index $check 0) $at (index $check 1) (index $check 2)) -}}
{{- end -}}
{{- range $i, $ns := ($v.watchNamespaces | default list) -}}
{{- include "eventrouter.checkPattern" (list (printf "watchNamespaces[%d]" $i) $ns `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$` "a namespace's name (lowercase letters, digits and '-', first and last a letter or digit)") -}}
{{- end -}}
{{- range $i, $flag := (include "eventrouter.flags" . | fromJsonArray) -}}
{{- include "eventrouter.checkPattern" (list (printf "sinks.flags[%d]" $i) $flag `(?s)^(.*:.*|.*[^A-Za-z0-9_.\s-].*|\s*stdout\s*)$` "a sink flag, TYPE:URL?options (of the built-in types only stdout may be given alone; write TYPE: for another's that needs no URL)") -}}
{{- end -}}
{{- end -}}

{{/* Before any other check: the keys of the objects whose schema lets a key that may hold a credential
through to here (see checkKeys). */}}
{{- define "eventrouter.checkTypedKeys" -}}
{{- $v := .Values -}}
{{- $name := `^[A-Za-z0-9_.-]+$` -}}
{{- include "eventrouter.checkKeys" (list "values" $v $name "one of the chart's values (values.yaml)") -}}
{{- include "eventrouter.checkKeys" (list "config" $v.config $name "one the router's config takes") -}}
{{- include "eventrouter.checkKeys" (list "credentials" $v.credentials $name "one of existingSecret, values, mountPath, env") -}}
{{- include "eventrouter.checkKeys" (list "credentials.values" $v.credentials.values `^[-._a-zA-Z0-9]+$` "a Secret's key (letters, digits, '-', '_', '.')") -}}
{{- range $i, $env := ($v.credentials.env | default list) -}}
{{- $where := printf "credentials.env[%d]" $i -}}
{{- include "eventrouter.checkKeys" (list $where $env $name "name or key") -}}
{{- if and (kindIs "map" $env) (kindIs "string" $env.name) (not (regexMatch `^[A-Za-z_][A-Za-z0-9_]*$` $env.name)) -}}
{{- /* `name: LOKI_PASSWORD=S3cret`: shownKey's "did you mean LOKI_PASSWORD=…?" suggested the spelling
       refused here. */ -}}
{{- if regexMatch `^[A-Za-z_][A-Za-z0-9_]*=` $env.name -}}
{{- $head := regexReplaceAll `(?s)=.*$` $env.name "" -}}
{{- fail (printf "%s: name %q (the rest not shown: did you mean name: %s? An item's name holds only the variable's name; the value goes in credentials.values, under the Secret key its key: names)" $where (print $head "=…") $head) -}}
{{- end -}}
{{- fail (printf "%s: name %s is no environment variable's name (letters, digits and '_', not first a digit); the variable's value comes from the Secret's key" $where (include "eventrouter.shownKey" $env.name)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $secret := ($v.imagePullSecrets | default list) -}}
{{- include "eventrouter.checkKeys" (list (printf "imagePullSecrets[%d]" $i) $secret $name "name") -}}
{{- end -}}
{{- /* The chart's other objects (`leaderElection: {leaseName:S3cret}`: "additional properties
       'leaseName:S3cret' not allowed"), and the maps of Kubernetes keys, whose schema error for a
       value that is no string names the key (`podAnnotations: {vault.hashicorp.com/token:S3cret}`,
       a YAML flow without a space, is that key with a null value). A Kubernetes key holds letters,
       digits, '-', '_', '.' and a '/' after its prefix. */ -}}
{{- $kubeKey := `^[A-Za-z0-9_./-]*$` -}}
{{- $objects := list "image" "sinks" "checkpoint" "persistence" "leaderElection" "serviceAccount" "rbac" "metrics" "metrics.service" "metrics.serviceMonitor" "podDisruptionBudget" "grafanaDashboard" "resources" "strategy" -}}
{{- $maps := list "podAnnotations" "podLabels" "nodeSelector" "persistence.annotations" "serviceAccount.annotations" "metrics.service.annotations" "metrics.serviceMonitor.labels" "grafanaDashboard.labels" "grafanaDashboard.annotations" "resources.requests" "resources.limits" -}}
{{- range $path := concat $objects $maps -}}
{{- $at := $v -}}
{{- range $part := splitList "." $path -}}
{{- if and (kindIs "map" $at) (hasKey $at $part) -}}{{- $at = get $at $part -}}{{- else -}}{{- $at = dict -}}{{- end -}}
{{- end -}}
{{- if has $path $objects -}}
{{- include "eventrouter.checkKeys" (list $path $at $name (printf "one of %s's keys (values.yaml)" $path)) -}}
{{- else -}}
{{- include "eventrouter.checkKeys" (list $path $at $kubeKey "a key Kubernetes takes there (letters, digits, '-', '_', '.', and a '/' after a prefix)" `^[A-Za-z0-9_./-]+$`) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "eventrouter.validate" -}}
{{- include "eventrouter.checkTypedKeys" . -}}
{{- include "eventrouter.checkPatterns" . -}}
{{- $v := .Values -}}
{{- $chartMounts := list (list "the config file" "/etc/eventrouter/config.yaml") (list "the sink flags file" "/etc/eventrouter/sink-flags") (list "the writable /tmp" "/tmp") -}}
{{- $credentials := ternary (list (list "credentials.mountPath" $v.credentials.mountPath)) (list) (ne (include "eventrouter.credentialsSecretName" .) "") -}}
{{- $data := ternary (list (list "checkpoint.dataDir" $v.checkpoint.dataDir)) (list) (ne $v.checkpoint.mode "none") -}}
{{- range $own := $data -}}
{{- include "eventrouter.checkMountPath" (list (index $own 0) (index $own 1) (concat $chartMounts $credentials)) -}}
{{- end -}}
{{- range $own := $credentials -}}
{{- include "eventrouter.checkMountPath" (list (index $own 0) (index $own 1) (concat $chartMounts $data)) -}}
{{- end -}}
{{- if and (gt (int $v.replicaCount) 1) (not $v.leaderElection.enabled) -}}
{{- fail "replicaCount > 1 requires leaderElection.enabled=true: without it every replica delivers every event" -}}
{{- end -}}
{{- if gt (add (int $v.shutdownTimeout) 5) (int $v.terminationGracePeriodSeconds) -}}
{{- fail (printf "shutdownTimeout (%d) must be at least 5 s below terminationGracePeriodSeconds (%d): after the drain the router still writes its spools, the checkpoint and the lease release before the kubelet kills the pod" (int $v.shutdownTimeout) (int $v.terminationGracePeriodSeconds)) -}}
{{- end -}}
{{- /* Kubernetes makes a strategy without a type (the short form {rollingUpdate: …}) a RollingUpdate. */ -}}
{{- if and $v.strategy (ne (toString $v.strategy.type) "Recreate") (not $v.leaderElection.enabled) -}}
{{- fail "strategy RollingUpdate needs leaderElection.enabled=true: without it the old and the new pod would both deliver during the rollout (a strategy without type is a RollingUpdate to Kubernetes; set type: Recreate)" -}}
{{- end -}}
{{- if $v.leaderElection.enabled -}}
{{- if not (lt (float64 $v.leaderElection.renewDeadline) (float64 $v.leaderElection.leaseDuration)) -}}
{{- fail "leaderElection.renewDeadline must be below leaderElection.leaseDuration: a leader must stop before its lease can expire" -}}
{{- end -}}
{{- if not (lt (mulf 1.2 (float64 $v.leaderElection.retryPeriod)) (float64 $v.leaderElection.renewDeadline)) -}}
{{- fail "leaderElection.renewDeadline must be more than 1.2 × leaderElection.retryPeriod (as client-go requires): a leader needs room for a jittered retry before it stops" -}}
{{- end -}}
{{- end -}}
{{- if and $v.credentials.existingSecret $v.credentials.values -}}
{{- fail "set credentials.existingSecret or credentials.values, not both" -}}
{{- end -}}
{{- if and $v.credentials.env (not (include "eventrouter.credentialsSecretName" .)) -}}
{{- fail "credentials.env needs credentials.existingSecret or credentials.values" -}}
{{- end -}}
{{- range $i, $ns := ($v.watchNamespaces | default list) -}}
{{- if not (kindIs "string" $ns) -}}
{{- fail (printf "watchNamespaces[%d] is %v (%s), not a namespace name: YAML reads null, ~, on/off, yes/no, true/false and numbers unquoted as such; quote it (\"%v\")" $i $ns (kindOf $ns) $ns) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $v.config "namespaces" -}}
{{- fail "config.namespaces is not used: set watchNamespaces (it also scopes the RBAC)" -}}
{{- end -}}
{{- if hasKey $v.config "cluster_name" -}}
{{- fail "config.cluster_name is not used: set clusterName" -}}
{{- end -}}
{{- if hasKey $v.config "data_dir" -}}
{{- fail "config.data_dir is not used: set checkpoint.mode=dataDir and checkpoint.dataDir (the chart mounts the volume)" -}}
{{- end -}}
{{- if and (not (include "eventrouter.flags" . | fromJsonArray)) (not $v.config.sinks) -}}
{{- fail "no sinks configured: set sinks.flags and/or config.sinks" -}}
{{- end -}}
{{- if $v.persistence.perReplica -}}
{{- if not $v.persistence.enabled -}}
{{- fail "persistence.perReplica needs persistence.enabled=true: its size, storageClass, accessModes and annotations make each replica's claim" -}}
{{- end -}}
{{- if eq $v.checkpoint.mode "none" -}}
{{- fail "persistence.perReplica needs a data dir for the claims to hold: checkpoint.mode configMap (each replica's spool and dead letters on its claim) or dataDir (its checkpoint too), not none" -}}
{{- end -}}
{{- if $v.persistence.existingClaim -}}
{{- fail "persistence.perReplica creates a claim per replica (data-<fullname>-<ordinal>); persistence.existingClaim cannot be each replica's own: leave it empty" -}}
{{- end -}}
{{- if $v.strategy -}}
{{- fail "strategy is the Deployment's; with persistence.perReplica the StatefulSet replaces one pod at a time, the old one gone before its successor starts: leave strategy empty" -}}
{{- end -}}
{{- /* The StatefulSet controller labels each pod controller-revision-hash=<name>-<hash of up to 10
       characters>, a label value of at most 63: with a longer name no pod is ever created. */ -}}
{{- $fullname := include "eventrouter.fullname" . -}}
{{- if gt (len $fullname) 52 -}}
{{- fail (printf "persistence.perReplica: the StatefulSet's name %q has %d characters, more than 52 (Kubernetes labels its pods controller-revision-hash=<name>-<hash>, at most 63 characters, and creates none otherwise); set fullnameOverride or a shorter release name" $fullname (len $fullname)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.persistence.enabled (ne $v.checkpoint.mode "dataDir") (not (and $v.persistence.perReplica (eq $v.checkpoint.mode "configMap"))) -}}
{{- fail (printf "persistence.enabled needs checkpoint.mode=dataDir (the default is configMap, which needs no volume; set checkpoint.mode=dataDir to keep the checkpoint on the claim, for checkpoints past the ConfigMap's 1 MiB, about 50,000 events), or persistence.perReplica=true (a claim per replica for its spool and dead letters beside the ConfigMap checkpoint), not %q" (toString $v.checkpoint.mode)) -}}
{{- end -}}
{{- if eq $v.checkpoint.mode "configMap" -}}
{{- $checkpoint := include "eventrouter.checkpointConfigMapName" . -}}
{{- $fullname := include "eventrouter.fullname" . -}}
{{- /* Each checkpoint write replaces the whole ConfigMap's data: the chart's config.yaml (the next pod
       could not mount it), the dashboard or the cluster's CA bundle would be gone. */ -}}
{{- if has $checkpoint (list $fullname (printf "%s-dashboard" $fullname) "kube-root-ca.crt") -}}
{{- fail (printf "checkpoint.configMapName %q is a ConfigMap the chart or the cluster keeps something else in (each checkpoint write replaces its data); leave it empty for %s-checkpoint, or choose another name" $checkpoint $fullname) -}}
{{- end -}}
{{- end -}}
{{- if and $v.persistence.enabled (gt (int $v.replicaCount) 1) (not (has "ReadWriteMany" $v.persistence.accessModes)) (not $v.persistence.perReplica) -}}
{{- fail "replicaCount > 1 cannot share a ReadWriteOnce volume: use checkpoint.mode=configMap, a ReadWriteMany claim, or persistence.perReplica=true (a claim per replica)" -}}
{{- end -}}
{{- $names := list -}}
{{- range $line := .Files.Lines "files/credential-options.txt" -}}
{{- $line = trim $line -}}
{{- if and $line (not (hasPrefix "#" $line)) -}}{{- $names = append $names (lower $line) -}}{{- end -}}
{{- end -}}
{{- if not $names -}}
{{- fail "files/credential-options.txt is missing from the chart" -}}
{{- end -}}
{{- $sinkOptions := .Files.Get "files/sink-options.json" | fromJson -}}
{{- $oneValue := .Files.Get "files/one-value-options.json" | fromJson -}}
{{- $passthroughFile := .Files.Get "files/url-query-passthrough.json" -}}
{{- $passthrough := $passthroughFile | fromJsonArray -}}
{{- if not (and $sinkOptions $oneValue $passthroughFile) -}}
{{- fail "files/sink-options.json, one-value-options.json or url-query-passthrough.json is missing from the chart" -}}
{{- end -}}
{{- $types := keys $oneValue -}}
{{- range $i, $sink := ($v.config.sinks | default list) -}}
{{- $type := toString $sink.type -}}
{{- /* Before anything names the sink: a flag ported whole (`type: loki:http://u:S3cret@l:3100`) was
       printed by every refusal of it, and `Loki:S3cret` rendered (a plugin's type) and the router
       printed it at start. Checked as a flag's type is, and not quoted. */ -}}
{{- if not (regexMatch `^[A-Za-z0-9_.-]+$` $type) -}}
{{- fail (printf "config.sinks[%d]: option \"type\" is no sink type (letters, digits, '_', '.', '-'; a flag's URL and options go in url: and the sink's options); not shown, as it may hold a credential" $i) -}}
{{- end -}}
{{- /* Named by its name: only one safe to show. `name: loki:http://admin:S3cret@l:3100` (a flag ported
       whole) was printed by every refusal of the entry, the user-info refusal of that very name too. */ -}}
{{- $name := ternary $sink.name "" (kindIs "string" $sink.name) -}}
{{- $shownType := include "eventrouter.shownName" $type -}}
{{- $where := printf "config.sinks[%d]" $i -}}
{{- if not $name -}}{{- if $shownType -}}{{- $where = printf "%s (%s)" $where $shownType -}}{{- end -}}
{{- else if include "eventrouter.shownName" $name -}}{{- $where = printf "%s (%s)" $where $name -}}
{{- else if $shownType -}}{{- $where = printf "%s (a %s sink, its name not shown)" $where $shownType -}}
{{- else -}}{{- $where = printf "%s (its name not shown)" $where -}}
{{- end -}}
{{- /* The router takes it, and prints it in its logs and metric labels: a name:value, name=value or a
       URL's user info is refused before anything else names the entry. */ -}}
{{- include "eventrouter.checkNameText" (list $where "option \"name\"" $name) -}}
{{- include "eventrouter.checkTypeCase" (list $where $type $types) -}}
{{- range $key, $value := $sink -}}
{{- /* Before anything names the key. The schema lets a key that is no option's name through (its
       additional-properties error printed it whole: `{password:S3cret}`, a YAML flow without a space).
       A plugin's too: its entry is not in the schema, and the key rendered into the ConfigMap. */ -}}
{{- if not (regexMatch `^[A-Za-z0-9_.-]+$` $key) -}}
{{- if hasKey $oneValue $type -}}
{{- fail (printf "%s: option %s is not one the %s sink takes (in YAML, name: value has a space after the colon); the router would refuse it at start (exit 2)" $where (include "eventrouter.shownKey" $key) $type) -}}
{{- end -}}
{{- fail (printf "%s: option %s is no option's name (letters, digits, '_', '.', '-'; in YAML, name: value has a space after the colon); it would be rendered into the ConfigMap as written" $where (include "eventrouter.shownKey" $key)) -}}
{{- end -}}
{{- include "eventrouter.checkSecretValue" (list $where $key $value $names) -}}
{{- /* A number written as text ("5s", "", "1e3" for an integer), or out of its bounds ("0"): the
       schema judges a YAML number, the text is judged here as in a flag (without its + for a space). */ -}}
{{- /* The router takes the options in a url's query as a flag's: judged as one. */ -}}
{{- /* A plugin's too: its query keys are its options, as a flag's (a key typed name:value). */ -}}
{{- if and (eq $key "url") (kindIs "string" $value) (contains "?" $value) -}}
{{- include "eventrouter.checkQueryName" (list (printf "config.sinks[%d] url" $i) (index (splitn "?" 2 $value) "_1")) -}}
{{- include "eventrouter.checkFlagKeys" (list (printf "config.sinks[%d] url" $i) (printf "%s:%s" $type $value) $sinkOptions $oneValue $passthrough) -}}
{{- end -}}
{{- $rule := (get $sinkOptions $type | default dict) | dig $key dict -}}
{{- $item := $value -}}
{{- if and (kindIs "slice" $value) (eq (len $value) 1) -}}{{- $item = index $value 0 -}}{{- end -}}
{{- if and (hasKey $rule "number") (kindIs "string" $item) -}}
{{- with include "eventrouter.numberWrong" (list $item $rule) -}}
{{- fail (printf "%s: option %q %s, must be %s; the router would refuse it at start (exit 2)" $where $key (include "eventrouter.shownValue" (list $key $item true)) .) -}}
{{- end -}}
{{- end -}}
{{- /* `level`: the schema applies its pattern to a value its error may show only; another
       (`Warning&password=S3cret`, a key pasted there) is judged here and not shown. */ -}}
{{- $pattern := include "eventrouter.rulePattern" $rule -}}
{{- if and $pattern (kindIs "string" $item) (not (regexMatch $pattern $item)) -}}
{{- fail (printf "%s: option %q %s, must be a value matching %s; the router would refuse it at start (exit 2)" $where $key (include "eventrouter.shownValue" (list $key $item false)) $pattern) -}}
{{- end -}}
{{- $texts := list $value -}}
{{- if kindIs "slice" $value -}}{{- $texts = $value -}}{{- else if kindIs "map" $value -}}{{- $texts = values $value -}}{{- end -}}
{{- range $text := $texts -}}
{{- if kindIs "string" $text -}}
{{- include "eventrouter.checkUserInfo" (list $where (printf "option %s" (include "eventrouter.shownKey" $key)) $text) -}}
{{- /* The router takes the options in `url`'s query as --sink does; other URLs keep theirs, and
       a credential in them is as readable. */ -}}
{{- if and (regexMatch `^[A-Za-z][A-Za-z0-9+.-]*://` $text) (contains "?" $text) -}}
{{- include "eventrouter.checkQuery" (list $where (index (splitn "?" 2 $text) "_1") $names) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $i, $flag := (include "eventrouter.flags" . | fromJsonArray) -}}
{{- include "eventrouter.checkFlag" (list (printf "sinks.flags[%d]" $i) $flag $names $types) -}}
{{- end -}}
{{- /* A --sink in extraArgs is as visible in the pod spec (argparse also takes --si and --sin). */ -}}
{{- range $i, $arg := ($v.extraArgs | default list) -}}
{{- $arg = toString $arg -}}
{{- if regexMatch `^--si(n|nk)?=` $arg -}}
{{- include "eventrouter.checkFlag" (list (printf "extraArgs[%d]" $i) (regexReplaceAll `^--si(n|nk)?=` $arg "") $names $types) -}}
{{- else if and (regexMatch `^--si(n|nk)?$` $arg) (lt (add1 $i) (len $v.extraArgs)) -}}
{{- include "eventrouter.checkFlag" (list (printf "extraArgs[%d]" (add1 $i)) (index $v.extraArgs (add1 $i)) $names $types) -}}
{{- else if regexMatch `^[\s\p{Z}]*--si(n|nk)?([\s\p{Z}]|=)` $arg -}}
{{- /* One item "--sink VALUE" (any space: Go's \s is ASCII, a non-breaking one is not) or " --sink=…"
       is one argument to the router, no --sink: it refuses it at start (exit 2) and prints it whole,
       credentials and all; the check above skipped it. */ -}}
{{- include "eventrouter.checkFlag" (list (printf "extraArgs[%d]" $i) (regexReplaceAll `^[\s\p{Z}]*--si(n|nk)?[\s\p{Z}=]+` $arg "") $names $types) -}}
{{- fail (printf "extraArgs[%d]: a --sink and its value in one item, parted by a space (also a non-breaking one) or after one, reach the router as one argument, which is no option: it refuses it at start (exit 2); write --sink=VALUE, or --sink and the value as two items" $i) -}}
{{- else -}}
{{- /* Any other item (--sinks=…, --sink-…, a value after another flag) with a URL's user info or a
       credential in a query: the router refuses what it does not take and prints it (masked), but
       the pod spec holds the literal. */ -}}
{{- include "eventrouter.checkUserInfo" (list (printf "extraArgs[%d]" $i) "the item" $arg) -}}
{{- if contains "?" $arg -}}
{{- include "eventrouter.checkQuery" (list (printf "extraArgs[%d]" $i) (index (splitn "?" 2 $arg) "_1") $names) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* An extraEnv literal is as readable in the pod spec: refused for a variable an env: reference
       names (it holds a credential) or whose name says it is one (LOKI_PASSWORD, DINGTALK_TOKEN,
       API_KEY); the value is never printed. Other literals (GOMAXPROCS, SSL_KEY_FILE) render. */ -}}
{{- $referenced := printf "%s\n%s\n%s" (toYaml $v.config) (join "\n" (include "eventrouter.flags" . | fromJsonArray)) (join "\n" ($v.extraArgs | default list)) -}}
{{- range $i, $env := ($v.extraEnv | default list) -}}
{{- /* A YAML flow {name: X, value:S3cret} (no space) makes a key holding the value, rendered into the
       pod spec as written; Kubernetes' refusal of the unknown field would print it. */ -}}
{{- range $key, $_ := (kindIs "map" $env | ternary $env dict) -}}
{{- if not (has $key (list "name" "value" "valueFrom")) -}}
{{- fail (printf "extraEnv[%d]: key %s is not one of an environment variable's (name, value, valueFrom; in YAML, name: value has a space after the colon)" $i (include "eventrouter.shownKey" $key)) -}}
{{- end -}}
{{- end -}}
{{- if and (kindIs "map" $env) (hasKey $env "value") (ne (toString (index $env "value")) "") (ne (toString (index $env "value")) "<nil>") -}}
{{- $name := toString (index $env "name") -}}
{{- $byReference := regexMatch (printf `env:%s([^A-Za-z0-9_]|$)` (regexQuoteMeta $name)) $referenced -}}
{{- if or $byReference (regexMatch (include "eventrouter.envSecretPattern" dict) $name) -}}
{{- fail (printf "extraEnv[%d] (%s) holds a literal value, readable by whoever may read the pod spec, %s: put the value in a Secret and list the variable in credentials.env (name and key, a secretKeyRef to credentials.existingSecret or credentials.values), or give it as valueFrom.secretKeyRef%s" $i $name (ternary "and an env: reference reads it (a credential)" "and its name says it is a credential" $byReference) (ternary "" "; a value that is no secret under such a name (a ROUTING_KEY) can come from a ConfigMap: valueFrom.configMapKeyRef" $byReference)) -}}
{{- end -}}
{{- /* Whatever the name: a URL's user info (HTTPS_PROXY=http://user:password@proxy, which the robots'
       proxy reads) is refused as it is in flags, config and extraArgs. */ -}}
{{- if include "eventrouter.hasUserInfo" (toString (index $env "value")) -}}
{{- fail (printf "extraEnv[%d] (%s) holds a URL's user info (scheme://user:password@host), readable by whoever may read the pod spec: put the whole value in a Secret and list the variable in credentials.env (name and key, a secretKeyRef to credentials.existingSecret or credentials.values), or give it as valueFrom.secretKeyRef" $i $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The pod's args hold the chart's own --config (the values' config); the router refuses a second at
       start (exit 2, "given more than once"), and argparse reads --conf and --confi as --config. */ -}}
{{- range $i, $arg := ($v.extraArgs | default list) -}}
{{- if regexMatch `^--conf(i|ig)?(=|$)` (toString $arg) -}}
{{- fail (printf "extraArgs[%d]: --config: the chart gives the router its own --config=/etc/eventrouter/config.yaml (from the values' config), and the router refuses a second at start (exit 2, given more than once); write the file's sinks in config.sinks or sinks.flags instead" $i) -}}
{{- end -}}
{{- end -}}
{{- /* After the credential checks, whose messages say more about a key that holds one. */ -}}
{{- include "eventrouter.checkSinkNames" . -}}
{{- range $found := (include "eventrouter.sinkFlagsWhere" . | fromJsonArray) -}}
{{- include "eventrouter.checkFlagKeys" (list (index $found 0) (index $found 1) $sinkOptions $oneValue $passthrough) -}}
{{- end -}}
{{- end -}}
