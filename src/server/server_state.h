// What the routes of `monet serve` share (src/server only).
#pragma once
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "monet/chat.h"
#include "monet/image.h"
#include "monet/scheduler.h"
#include "monet/server.h"

namespace monet {

// One route of the server. The table is registered with httplib::Server and
// also called without a socket by dispatch() (the fuzz targets): both run the
// same handler code.
struct Route {
  std::string method;  // "GET" or "POST"
  std::string path;    // exact
  httplib::Server::Handler handler;
};

struct Server::State {
  ServeOptions opts;
  httplib::Server http;
  // Set once by the loader; read by the routes only after `ready`.
  ServedModel served;
  std::unique_ptr<BatchScheduler> scheduler;
  std::optional<ChatFormat> chat_format;
  std::string chat_format_error;  // why there is none
  std::string model_name;
  int64_t context = 0;
  std::atomic<bool> ready{false}, stopping{false};
  std::mutex lifecycle;  // the loader's hand-over against shutdown()
  std::exception_ptr load_error;
  std::atomic<int64_t> in_flight{0};  // generation requests whose response is not finished
  std::atomic<int64_t> http_requests{0}, http_errors{0};
  std::atomic<uint64_t> next_response_id{1};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  int64_t created_unix = 0;
  std::vector<Route> routes;  // add_*_routes fill it; register_routes hands it to `http`
};

// An image sent inline as a data: URL (data:image/png;base64,...), decoded
// (`name` in its errors). A remote URL, a checkpoint without a vision tower,
// bad base64 or a corrupt image throw a 400 naming `param` (a std::exception).
Image decode_image_data_url(const Server::State& st, const std::string& url, const std::string& param,
                            const std::string& name);

void add_viewer_routes(Server::State& st);
void add_openai_routes(Server::State& st);
// Before routing: counts the request; checks the API key; refuses API calls
// while loading or stopping (Handled: `res` is the answer).
httplib::Server::HandlerResponse pre_route(Server::State& st, const httplib::Request& req, httplib::Response& res);
// Every response with status >= 400: counts it and gives httplib's own errors
// (no route, body too large, malformed) an OpenAI-shaped body.
httplib::Server::HandlerResponse on_error_response(Server::State& st, const httplib::Request& req,
                                                   httplib::Response& res);
// The route table and the two hooks above, handed to st.http.
void register_routes(Server::State& st);
// What httplib does with a parsed request, without a socket: pre_route, the
// route of req.method and req.path (404 when none), on_error_response. A
// content provider set by the route is left in `res` for the caller to drive.
void dispatch(Server::State& st, const httplib::Request& req, httplib::Response& res);
// The loader's hand-over: checks the options against the model, picks the
// chat format and the served name, starts the scheduler and sets `ready`.
// False when the server is stopping (nothing installed).
bool install_model(Server::State& st, ServedModel served);

}  // namespace monet
