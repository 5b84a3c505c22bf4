#!/usr/bin/env bash
# The steps of the evolve job (.github/workflows/evolve.yml, action.yml), runnable anywhere:
#
#   RECIPE=recipes/demo.yml bash .github/scripts/evolve-job.sh names     # run folder and artifact name
#   RECIPE=recipes/demo.yml bash .github/scripts/evolve-job.sh restore   # the previous run's folder, from its artifact
#   RECIPE=recipes/demo.yml bash .github/scripts/evolve-job.sh run       # search (resumes a restored study)
#   RECIPE=recipes/demo.yml PUBLISH=true PUBLISH_REPO=me/x bash .github/scripts/evolve-job.sh publish
#
# Inputs (environment): RECIPE (required); TRIALS; TIMEOUT (seconds after which no new trial starts);
# TIME_LIMIT (seconds after which the search step is stopped, so the artifact upload that follows still
# runs within the job's limit); RUN_DIR (default runs/<recipe stem>);
# ARTIFACT (default evolve-<recipe stem>); EVOLVE_ARGS (more `mergekit-evolve run` options, e.g.
# "--workers 2"); PUBLISH (true/false), PUBLISH_REPO, PUBLISH_SPACE (default: the recipe's
# publish section), PUBLISH_DRY_RUN (a folder: write what would be uploaded, send nothing);
# HF_TOKEN, HF_ENDPOINT as for `mergekit-evolve publish`. `run` never pushes: with PUBLISH=true it checks
# the token before searching, and the publish step pushes after the run folder is kept. `restore` uses the GitHub CLI with
# GH_TOKEN and GITHUB_REPOSITORY (set on GitHub); elsewhere it restores nothing.
set -euo pipefail

: "${RECIPE:?set RECIPE to the recipe path}"
STEM="$(basename "${RECIPE%.*}")"
RUN_DIR="${RUN_DIR:-runs/$STEM}"
ARTIFACT="${ARTIFACT:-evolve-$STEM}"

say() { echo "evolve-job: $*"; }

names() {
  say "run folder $RUN_DIR, artifact $ARTIFACT"
  if [ -n "${GITHUB_OUTPUT:-}" ]; then
    { echo "run-dir=$RUN_DIR"; echo "artifact=$ARTIFACT"; } >> "$GITHUB_OUTPUT"
  fi
}

restore() {
  if [ -e "$RUN_DIR" ]; then
    say "$RUN_DIR exists; resuming it as it is"
  else
    download
  fi
  rebuild_stage_winners
}

download() {
  if [ -z "${GH_TOKEN:-}" ] || [ -z "${GITHUB_REPOSITORY:-}" ] || ! command -v gh > /dev/null; then
    say "not on GitHub (GH_TOKEN, GITHUB_REPOSITORY and gh needed): nothing to restore, starting afresh"
    return
  fi
  # The newest unexpired artifact of that name, from any run of any workflow of this repository.
  local run_id
  run_id="$(gh api "repos/$GITHUB_REPOSITORY/actions/artifacts?name=$ARTIFACT&per_page=20" \
    --jq '[.artifacts[] | select(.expired | not)][0].workflow_run.id // empty')"
  if [ -z "$run_id" ]; then
    say "no artifact named $ARTIFACT yet: starting afresh"
    return
  fi
  say "restoring $RUN_DIR from artifact $ARTIFACT of run $run_id"
  gh run download "$run_id" --repo "$GITHUB_REPOSITORY" --name "$ARTIFACT" --dir "$RUN_DIR"
}

rebuild_stage_winners() {
  # The artifact holds no weights (they would pile up, one copy a dispatch). A one-stage run writes
  # best/ again at its end, but a later stage of a staged recipe merges an earlier stage's winner:
  # merge it again from its concrete config.
  local config best tmp
  while IFS= read -r -d '' config; do
    best="$(dirname "$config")"
    if compgen -G "$best/*.safetensors" > /dev/null; then continue; fi
    say "merging the winner in $best again (the artifact keeps no weights)"
    tmp="$(mktemp -d)"
    mergekit-evolve merge "$config" "$tmp/out"
    mv "$tmp"/out/*.safetensors "$best"/
    if [ -f "$tmp/out/model.safetensors.index.json" ]; then mv "$tmp/out/model.safetensors.index.json" "$best"/; fi
    rm -rf "$tmp"
  done < <(find "$RUN_DIR" -mindepth 3 -maxdepth 3 -path '*/best/mergekit_config.yml' -print0 2> /dev/null)
}

check_token() {
  # A token the publish step would be refused with is found before hours of search, not after.
  if [ -z "${HF_TOKEN:-}" ]; then
    echo "evolve-job: publishing was asked for but HF_TOKEN is empty: add a write token as the repository secret HF_TOKEN" >&2
    exit 1
  fi
  local user
  if ! user="$(python -c 'from huggingface_hub import HfApi; print(HfApi().whoami()["name"])' 2> /dev/null)"; then
    echo "evolve-job: the Hub refused HF_TOKEN (invalid or expired, or ${HF_ENDPOINT:-the Hub} unreachable): set a write token as the secret HF_TOKEN" >&2
    exit 1
  fi
  say "HF_TOKEN belongs to $user; the publish step pushes after the search"
}

run() {
  if [ "${PUBLISH:-false}" = "true" ]; then check_token; fi
  # the recipe's own publish: push is left to the publish step, which runs after the artifact upload
  local args=("$RECIPE" --run-dir "$RUN_DIR" --no-progress --no-publish)
  if [ -n "${TRIALS:-}" ]; then args+=(--trials "$TRIALS"); fi
  if [ -n "${TIMEOUT:-}" ]; then args+=(--timeout "$TIMEOUT"); fi
  # EVOLVE_ARGS is a list of options: split on spaces on purpose
  # shellcheck disable=SC2206
  if [ -n "${EVOLVE_ARGS:-}" ]; then args+=($EVOLVE_ARGS); fi
  say "mergekit-evolve ${args[*]}"
  if [ -z "${TIME_LIMIT:-}" ]; then
    mergekit-evolve "${args[@]}"
    return
  fi
  local status=0
  # SIGINT first: mergekit-evolve stops as on Ctrl-C, with every finished trial in the study
  timeout --signal=INT --kill-after=120 "$TIME_LIMIT" mergekit-evolve "${args[@]}" || status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 130 ] || [ "$status" -eq 137 ]; then
    echo "evolve-job: the search step reached TIME_LIMIT=${TIME_LIMIT}s and was stopped; its finished trials are kept (the next dispatch resumes them)" >&2
  fi
  return "$status"
}

publish() {
  if [ "${PUBLISH:-false}" != "true" ]; then
    say "publishing not asked for (PUBLISH=${PUBLISH:-false})"
    return
  fi
  local args=(publish "$RUN_DIR")
  if [ -n "${PUBLISH_REPO:-}" ]; then args+=(--repo "$PUBLISH_REPO"); fi
  if [ -n "${PUBLISH_SPACE:-}" ]; then args+=(--space "$PUBLISH_SPACE"); fi
  if [ -n "${PUBLISH_DRY_RUN:-}" ]; then args+=(--dry-run "$PUBLISH_DRY_RUN"); fi
  say "mergekit-evolve ${args[*]}"
  mergekit-evolve "${args[@]}"
}

case "${1:-}" in
  names | restore | run | publish) "$1" ;;
  *)
    echo "usage: RECIPE=path bash $0 names|restore|run|publish" >&2
    exit 2
    ;;
esac
